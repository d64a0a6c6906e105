"""Third step of `docker compose up` (service `handout`, as root): each container's own credentials.

`init` provisions every credential into the `provisioned` volume and the
bootstrap step wrote Grafana's admin password into `secrets`; both are
mounted here read-only. Each argument `NAME:UID:FILE,FILE...` (the list is
in docker-compose.yml, where tests/containers/test_compose_file.py checks
it) copies those files into NAME's own volume, mounted here at
/run/mailbus/handout/NAME and read-only in NAME's container, owned by UID
with mode 400. Any other file in that volume is removed, so a credential
taken off a service's list leaves its container at the next start.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

SOURCES = (Path("/run/mailbus/provisioned"), Path("/run/mailbus/bootstrap"))
HANDOUT = Path("/run/mailbus/handout")


def hand_out(name: str, uid: int, files: list[str]) -> None:
    """Make NAME's volume hold exactly these files, readable by uid alone."""
    target = HANDOUT / name
    for stale in set(os.listdir(target)) - set(files):
        path = target / stale
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for file in files:
        source = next((d / file for d in SOURCES if (d / file).is_file()), None)
        if source is None:
            sys.exit(f"handout: {file} for {name} was not provisioned")
        path = target / file
        path.write_bytes(source.read_bytes())
        os.chown(path, uid, uid)
        path.chmod(0o400)
    os.chown(target, uid, uid)
    target.chmod(0o500)
    print(f"handout: {name} holds {', '.join(files)}")


def main(args: list[str]) -> None:
    for arg in args:
        name, uid, files = arg.split(":")
        hand_out(name, int(uid), files.split(","))


if __name__ == "__main__":
    main(sys.argv[1:])
