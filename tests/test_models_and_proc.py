"""The model registry and the subprocess runner."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from daemon import proc
from daemon.errors import ModelError, ToolError, ToolTimeout
from daemon.models import ModelRegistry, source_problem


def test_registry_keeps_each_model_resident(checkpoint: Path, tmp_path: Path) -> None:
    """Asking twice for one checkpoint returns the same loaded model and loads it once."""
    registry = ModelRegistry(tmp_path, device="cpu")
    first = registry.get(str(checkpoint))
    assert registry.get(str(checkpoint)) is first
    assert registry.loads[(str(checkpoint), "cpu")] == 1
    assert first.dims.n_text_state == 64 and not registry.fp16


def test_unknown_model_lists_the_available_names(tmp_path: Path) -> None:
    """An unknown name is refused with whisper's list of official models, and nothing downloads."""
    registry = ModelRegistry(tmp_path / "models", device="cpu")
    with pytest.raises(ModelError, match=r"unknown model 'huge'; available: .*large-v3.*turbo.*CTranslate2"):
        registry.get("huge")
    assert not (tmp_path / "models").exists()
    missing = tmp_path / "missing.pt"
    assert source_problem(str(missing)) == f"checkpoint file not found: {missing}"


def test_corrupt_checkpoint_is_a_model_error(tmp_path: Path) -> None:
    """A file that is not a checkpoint fails with the model's name, not a torch traceback."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=f"{bad}: not a whisper checkpoint torch can read"):
        ModelRegistry(tmp_path, device="cpu").get(str(bad))


def test_cuda_device_without_cuda_is_refused(tmp_path: Path) -> None:
    """device: cuda on a machine without a usable GPU fails clearly at start-up."""
    import torch

    if torch.cuda.is_available():  # pragma: no cover - only on GPU machines
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match="no CUDA device"):
        ModelRegistry(tmp_path, device="cuda:0")


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A tool past its timeout is killed with its children, and the error says so."""
    marker = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(ToolTimeout, match=r"did not finish within 0\.5 s") as caught:
        proc.run(["sh", "-c", f"sleep 30 & echo $! > {marker}; wait"], timeout_s=0.5)
    assert time.monotonic() - started < 10
    assert caught.value.returncode is None
    child = int(marker.read_text())
    time.sleep(0.2)
    assert not _running(child)


def _running(pid: int) -> bool:
    # Killed orphans can linger as zombies where PID 1 does not reap; those are not running.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_failure_keeps_argv_and_stderr_tail() -> None:
    """A failing tool raises ToolError with its argv, exit code and last stderr lines."""
    script = "for i in $(seq 1 50); do echo line$i >&2; done; exit 3"
    with pytest.raises(ToolError) as caught:
        proc.run(["sh", "-c", script], timeout_s=10)
    err = caught.value
    assert err.returncode == 3 and err.argv[0] == "sh"
    assert err.stderr_tail.splitlines() == [f"line{i}" for i in range(31, 51)]
    assert "exited with code 3: line50" in str(err)


def test_missing_program_is_a_tool_error() -> None:
    """A program that is not installed is reported as such."""
    with pytest.raises(ToolError, match="program not found"):
        proc.run(["no-such-program-xyz"], timeout_s=5)


def test_an_idle_model_is_unloaded_and_loads_again_when_needed(checkpoint: Path, tmp_path: Path) -> None:
    """`model_idle_unload`: a model unused for the idle time leaves memory; the next file loads it again."""
    clock = [0.0]
    registry = ModelRegistry(tmp_path, device="cpu", clock=lambda: clock[0])
    first = registry.get(str(checkpoint))
    clock[0] = 500
    assert registry.unload_idle(600) == [] and registry.loaded() == [str(checkpoint)]
    clock[0] = 700
    assert registry.unload_idle(600) == [str(checkpoint)] and registry.loaded() == []
    assert registry.get(str(checkpoint)) is not first
    assert registry.loads[(str(checkpoint), "cpu")] == 2
