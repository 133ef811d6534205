"""Webhook callbacks: the durable outbox, signing and delivery."""
