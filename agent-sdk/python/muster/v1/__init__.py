"""Generated from proto/muster/v1 by scripts/gen_protos.py; do not edit."""
