"""Add, list and revoke the server's API keys (``X-API-Key``, for scripts and the 3D Slicer plugin).

    python scripts/api_keys.py --file /srv/medsam2/api_keys.json add --name slicer-ws3 --role annotator
    python scripts/api_keys.py --file /srv/medsam2/api_keys.json list
    python scripts/api_keys.py --file /srv/medsam2/api_keys.json revoke 3f2a9c0d1e4b

The file is the server's ``--conf api_keys_file``; the server re-reads it when it changes (no restart). ``add``
prints the key once: only its SHA-256 is stored. Roles: user, annotator, reviewer, admin (each includes the ones
before it). See docs/security.md#api-keys.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "medsam2"))

from lib.server.api_keys import ROLE_ORDER, ApiKeyFileError, add_key, read_keys, revoke_key  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", required=True, type=Path, help="the key file (the server's --conf api_keys_file)")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add a key and print it (once)")
    add.add_argument("--name", required=True, help="who or what uses it, e.g. slicer-ws3 (shown in the server log)")
    add.add_argument("--role", required=True, choices=ROLE_ORDER)
    commands.add_parser("list", help="list the keys (never the keys themselves)")
    revoke = commands.add_parser("revoke", help="revoke a key by its id (refused from the next request on)")
    revoke.add_argument("id")
    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            entry, secret = add_key(args.file, args.name, args.role)
            print(f"id {entry.id}, name {entry.name}, role {entry.role}. The key (shown only now):")
            print(secret)
        elif args.command == "list":
            print(f"{'id':12}  {'role':9}  {'created':25}  {'revoked':25}  name")
            for k in read_keys(args.file):
                print(f"{k.id:12}  {k.role:9}  {k.created:25}  {k.revoked or '-':25}  {k.name}")
        else:
            entry = revoke_key(args.file, args.id)
            print(f"revoked {entry.id} ({entry.name}) on {entry.revoked}")
    except ApiKeyFileError as e:
        print(f"api_keys: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
