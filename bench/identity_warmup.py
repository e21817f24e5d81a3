"""``python -m bench.identity_warmup``: how much of a warm-pool claim is the
guest's first ``post_restore`` after a restore (a one-off experiment cited in
bench/README.md; not part of ``kiln bench``).

Restores the base snapshot by hand (``bench.raw``), lets the VM idle as a pool
VM would, then times ping and post_restore several times in a row. Under TCG
the first post_restore runs guest code that was never translated since the
restore; later ones show what it costs once translated.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from bench import raw
from kiln.config import Settings
from kiln.runtime.images import ImageStore
from kiln.runtime.qemu import QemuHypervisor
from kiln.runtime.snapshots import BaseSnapshots, Shape

IDLE_SECONDS = 1.5
ROUNDS = 3


def main() -> None:
    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="kiln-warmup-")))
    try:
        image = ImageStore(settings).get("default")
        if image is None:
            raise SystemExit("the default image is not built")
        hypervisor = QemuHypervisor(settings)

        async def prepare() -> tuple[str, object]:
            accel = await hypervisor.decide_accel(image)
            return accel, await BaseSnapshots(settings, hypervisor).ensure(image, Shape(256, 1))

        accel, saved = asyncio.run(prepare())
        for attempt in range(ROUNDS):
            vm = raw.restore(saved, image, accel, settings.data_dir / f"w{attempt}",  # type: ignore[arg-type]
                             hostname="warmup", identity=False)
            try:
                time.sleep(IDLE_SECONDS)
                timings = []
                for call in range(3):
                    started = time.monotonic()
                    raw.reset_identity(vm.agent, f"vm-{attempt}-{call}")
                    timings.append(f"{(time.monotonic() - started) * 1000:.0f}")
                print(f"restore {attempt}: post_restore 1st/2nd/3rd = {' / '.join(timings)} ms")
            finally:
                vm.stop()
    finally:
        shutil.rmtree(settings.data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
