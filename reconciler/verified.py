"""What tproxyd knows of its sets' contents without reading them back.

At nftables generation G (read before listing; every committed transaction, anyone's, moves it)
our sets held contents with these digests: either read by a dump or written by our own batch.
While the generation is still G, the contents are known. The digests live in a small JSON record
per network namespace; the contents themselves in a pickle beside it, read only when a plan
needs the old contents of a set that is about to change (a dump at 100,000 ranges costs ~1 s).
"""

from __future__ import annotations

import contextlib
import pickle
from typing import Dict, Tuple

from tproxyd.state.intervals import Intervals

from . import statefiles
from .sysctl import NetnsRecord


class VerifiedSets:
    def __init__(self, state_dir: str):
        self.record = NetnsRecord(state_dir, "nft-verified")
        self.contents_path = self.record.path.removesuffix(".json") + ".pickle"

    def trusted(self, table: str, generation: int | None) -> Dict[str, str]:
        """Set name -> digest of its contents, valid now (empty when the generation moved)."""
        seen = self.record.load()
        if generation is None or seen.get("table") != table or seen.get("generation") != generation:
            return {}
        sets = seen.get("sets", {})
        return sets if isinstance(sets, dict) else {}

    def contents(self, name: str, digest: str) -> Intervals | None:
        # only a file we wrote; missing, damaged or foreign: a dump will tell
        found = statefiles.load_pickle(self.contents_path)
        entry = found.get(name) if isinstance(found, dict) else None
        return entry[1] if isinstance(entry, tuple) and entry[0] == digest else None

    def save(self, table: str, generation: int, sets: Dict[str, Tuple[str, Intervals]]) -> None:
        digests = {name: d for name, (d, _) in sets.items()}
        if digests != self.record.load().get("sets"):  # new contents: keep them first
            try:
                statefiles.write(self.contents_path, pickle.dumps(sets, pickle.HIGHEST_PROTOCOL))
            except OSError:
                with contextlib.suppress(OSError):
                    statefiles.remove(self.contents_path)
        self.record.save({"generation": generation, "table": table, "sets": digests})
