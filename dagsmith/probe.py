"""A container health probe: ``python -m dagsmith.probe URL`` exits 0 when URL answers 200.

The Python services' images have no curl or wget; Docker healthchecks call this instead
(``docker-compose.yml``). Only the standard library is imported, so a probe costs a few
milliseconds of CPU, not the start-up of the whole package.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request


def probe(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Whether ``url`` answers 200 within ``timeout`` seconds, and what was seen."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {getattr(exc, 'reason', exc)}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m dagsmith.probe URL", file=sys.stderr)
        return 2
    ok, seen = probe(argv[0])
    print(seen, file=sys.stderr if not ok else sys.stdout)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
