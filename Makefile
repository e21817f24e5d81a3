# The two commands of README.md; both run `setup` first (idempotent, fast when done).
.PHONY: setup run test

setup:
	scripts/setup.sh

run: setup
	.venv/bin/kiln serve

test:
	scripts/test.sh
