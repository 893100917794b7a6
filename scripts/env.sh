# Source me (bash): `source scripts/env.sh`. Paths made by scripts/setup.sh.
: "${ASR_CACHE:=$HOME/.cache/asr-lora}"
export ASR_CACHE
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
export PATH="$VENV/bin:$PATH"
export ASR_ASSETS="$REPO/assets"
# docker compose v2 (scripts/setup.sh), for `"$ASR_DOCKER_COMPOSE" config` without Docker.
export ASR_DOCKER_COMPOSE="$ASR_CACHE/docker-compose-2.26.1-4/docker-compose"
