# Sourced by scripts/serve and scripts/test: create .venv and install the project into it.
# Usage: ensure_venv EXTRAS   (e.g. "" or "dev,diffusers,scale")
ensure_venv() {
    local extras="$1"
    local stamp=".venv/.installed-${extras:-base}"
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    # Reinstall only when the project's requirements changed since the last install.
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        .venv/bin/python -m pip install -q --upgrade pip
        if [[ "$extras" == *diffusers* ]]; then
            # Pinned on purpose: this exact release is a CPU wheel on these machines' disk;
            # an unpinned torch pulls a multi-GB CUDA build.
            .venv/bin/python -m pip install -q "torch==2.13.0"
        fi
        if [ -n "$extras" ]; then
            .venv/bin/python -m pip install -q -e ".[${extras}]"
        else
            .venv/bin/python -m pip install -q -e .
        fi
        touch "$stamp"
    fi
}
