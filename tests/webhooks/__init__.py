"""Tests of openedits.webhooks: outbox, signing, delivery loop, admin endpoints."""
