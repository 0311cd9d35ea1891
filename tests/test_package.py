"""The package as installed: the build record (`arpg_kernels/_build.json`; an extension built for another torch is
not loaded, the package says so once and falls back), the version in one place, no Triton at import. The real
cross-torch install and the wheels are checked by scripts/check_dist.sh."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from arpg_kernels import _build, cpu

HERE = torch.__version__


def _minor_other() -> str:
    major, minor = HERE.split("+")[0].split(".")[:2]
    return f"{major}.{int(minor) - 1}.0+cpu"


@pytest.fixture
def record(tmp_path, monkeypatch):
    path = tmp_path / "_build.json"
    monkeypatch.setattr(_build, "RECORD", path)

    def write(content):
        path.write_text(content if isinstance(content, str) else json.dumps(content))

    return write


def test_same_minor_release_loads(record):
    major, minor = HERE.split("+")[0].split(".")[:2]
    record({"_cpu": {"torch": f"{major}.{minor}.99"}, "_C": {"torch": HERE, "cuda": torch.version.cuda}})
    assert _build.mismatch("_cpu") is None
    assert _build.mismatch("_C") is None


def test_other_minor_release_is_named(record):
    other = _minor_other()
    record({"_cpu": {"torch": other}})
    assert _build.mismatch("_cpu") == f"arpg_kernels._cpu was built for torch {other}, this is torch {HERE}"


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_other_cuda_major_is_named(record):
    other = str(int(torch.version.cuda.split(".")[0]) - 1) + ".6"
    record({"_C": {"torch": HERE, "cuda": other}})
    assert _build.mismatch("_C") == (
        f"arpg_kernels._C was built for CUDA {other}, this torch ({HERE}) uses CUDA {torch.version.cuda}"
    )


def test_cuda_build_under_cpu_torch_is_named(record, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    record({"_C": {"torch": HERE, "cuda": "13.0"}})
    assert "is a CPU-only build" in _build.mismatch("_C")


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"_cpu": "2.14"}', '{"_cpu": {"cuda": "13.0"}}'])
def test_missing_or_unreadable_record_means_try_loading(record, content):
    record(content)
    assert _build.built_for("_cpu") is None and _build.mismatch("_cpu") is None


def test_no_record_file(tmp_path, monkeypatch):
    monkeypatch.setattr(_build, "RECORD", tmp_path / "absent.json")
    assert _build.mismatch("_C") is None


@pytest.mark.skipif(not cpu.is_available(), reason=f"CPU kernels not built: {cpu.load_error()}")
def test_mismatched_cpu_kernels_are_not_loaded_and_the_reference_serves(tmp_path):
    """In a fresh process whose record says another torch: one warning line, the library not loaded
    (its ops not registered), the ops still answer, equal to the reference."""
    record = tmp_path / "_build.json"
    record.write_text(json.dumps({"_cpu": {"torch": _minor_other()}}))
    script = textwrap.dedent(f"""
        import warnings
        import torch
        from arpg_kernels import _build
        _build.RECORD = _build.Path({str(record)!r})
        import arpg_kernels as ak
        from arpg_kernels import reference
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from kv_cases import make_paged_case
        case = make_paged_case(3, head_dims=(64,), page_sizes=(16,), max_b=3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                out, _ = ak.paged_attention(*case.args(), causal=case.causal)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "\\n" not in messages[0], messages
        print(messages[0])
        from arpg_kernels import cpu
        assert not cpu._registered()  # the library was never loaded
        assert not cpu.is_available() and "built for torch" in cpu.load_error()
        scale = case.q.shape[-1] ** -0.5
        torch.testing.assert_close(out, reference.paged_attention(*case.args(), case.causal, scale, False)[0])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == (
        f"arpg: arpg_kernels._cpu was built for torch {_minor_other()}, this is torch {HERE}; CPU tensors use the "
        "reference ops (reinstall arpg-kernels against this torch to rebuild it)"
    )


def test_importing_the_package_and_running_a_cpu_op_does_not_import_triton():
    script = textwrap.dedent("""
        import sys
        import torch
        import arpg, arpg_kernels as ak
        assert "triton" not in sys.modules, "import"
        q = torch.randn(2, 2, 16)
        k_cache = torch.randn(1, 16, 2, 16)
        ak.paged_attention(q, k_cache, k_cache, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([5], dtype=torch.int32),
                           torch.tensor([0, 2], dtype=torch.int32), 2)
        assert "triton" not in sys.modules, "a CPU op"
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_version_is_written_once():
    """setup.py reads arpg_kernels/_version.py; both packages expose it; an installed distribution agrees."""
    from importlib.metadata import PackageNotFoundError, version

    import arpg
    import arpg_kernels

    text = (Path(arpg_kernels.__file__).parent / "_version.py").read_text()
    assert f'__version__ = "{arpg_kernels.__version__}"' in text
    assert arpg.__version__ == arpg_kernels.__version__
    try:
        installed = version("arpg-kernels")
    except PackageNotFoundError:
        pytest.skip("arpg-kernels is not installed (run from the source tree)")
    assert installed.split("+")[0] == arpg_kernels.__version__
