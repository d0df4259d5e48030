"""DataLoader workers forked while another thread imports a module (seen in ``make image-test``: a
train_fold container waited forever in a worker reading a shard from S3, because the MLflow thread
was importing ``encodings.idna`` at the moment of the fork and the worker inherited that import lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A fresh interpreter, so that no codec is cached yet. A thread holds the import lock of
# encodings.idna for a second, as a thread importing it does; meanwhile the main thread makes a loader
# whose worker encodes a host name with that codec, as urllib3 does for every S3 request.
_SCRIPT = """
import sys, threading, time
from importlib._bootstrap import _ModuleLockManager
from torch.utils.data import Dataset, SequentialSampler
from digilut.data import make_loader

assert "encodings.idna" not in sys.modules, "the premise: nothing imported the idna codec yet"

class Hosts(Dataset):
    def __len__(self):
        return 2
    def __getitems__(self, idx):
        return ["bücher.example".encode("idna") for _ in idx]

held = threading.Event()
def importing():
    with _ModuleLockManager("encodings.idna"):
        held.set()
        time.sleep(1.0)
threading.Thread(target=importing).start()
held.wait()
loader = make_loader(Hosts(), SequentialSampler(range(2)), batch_size=1, num_workers=1)
print([b for batch in loader for b in batch])
"""


def test_loader_workers_look_up_a_codec_another_thread_was_importing() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the worker too is killed when it hangs
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the DataLoader worker hung on the idna codec's import lock") from None
    assert proc.returncode == 0, err
    assert out.split() == ["[b'xn--bcher-kva.example',", "b'xn--bcher-kva.example']"]
