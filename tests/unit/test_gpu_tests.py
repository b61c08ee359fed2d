"""bench/gpu_tests.py (call 2): each test file in its own pytest process and timeout, so a file
that fails at import with an error that is no ImportError, or hangs, costs no other file's results."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import gpu_tests

pytestmark = pytest.mark.unit

FILES = {
    "test_hangs.py": "import time\nimport pytest\npytestmark = pytest.mark.gpu\n\n\ndef test_ok():\n    pass\n\n\n"
    "def test_hangs():\n    time.sleep(120)\n",
    "test_version_error.py": "import pytest\npytestmark = pytest.mark.gpu\n\n\nclass VersionError(Exception):\n"
    "    pass\n\n\nraise VersionError('gencode 7.36 is newer than the runtime 5.29')\n",
    "test_fine.py": "import pytest\npytestmark = pytest.mark.gpu\n\n\ndef test_a():\n    pass\n\n\n"
    "def test_b():\n    assert 1 == 2\n\n\n@pytest.mark.skip(reason='no')\ndef test_c():\n    pass\n",
}


@pytest.mark.slow
def test_each_file_runs_alone_so_a_hang_or_an_import_error_loses_no_other_results(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    files = [str(tmp_path / name) for name in FILES]
    assert gpu_tests.main([*files, "--budget-s", "24", "--out", str(tmp_path / "out")]) == 1
    table = (tmp_path / "out" / "gpu_tests.md").read_text()
    rows = {
        Path(r[0].strip("| ")).name: r for r in (ln.split(" | ") for ln in table.splitlines() if ln.startswith("| /"))
    }
    hang, broken, fine = rows["test_hangs.py"], rows["test_version_error.py"], rows["test_fine.py"]
    assert hang[1] == "TIMEOUT (8 s)" and hang[2:4] == ["1", "0"]  # the test it finished before the kill counts
    assert broken[1] == "FAIL (2)" and "VersionError" in broken[-1]
    assert fine[1] == "FAIL (1)" and fine[2:6] == ["1", "1", "0", "1"]
    assert re.search(r"^- .*test_fine.py: .*::test_b FAILED$", table, re.M)
    assert "VersionError" in (tmp_path / "out" / "gpu_tests.log").read_text()


MARKED = {  # files outside tests/gpu that apply the gpu mark
    "test_a.py": "import pytest\npytestmark = pytest.mark.gpu\n",
    "test_list.py": "import pytest\npytestmark = [pytest.mark.gpu, pytest.mark.slow]\n",
    "test_decorated.py": "import pytest\n\n\n@pytest.mark.gpu\ndef test_x():\n    pass\n",
    "test_method.py": "import pytest\n\n\nclass TestX:\n    @pytest.mark.gpu(reason='cuda')\n    def test_y(self):\n"
    "        pass\n",
    "test_broken.py": "import pytest\npytestmark = pytest.mark.gpu\n\ndef test_z(:\n",  # no parse: read by line
}
UNMARKED = {  # files that name the mark without applying it
    "test_c.py": "import pytest\npytestmark = pytest.mark.unit\n",
    "test_fixture.py": "FILES = {'test_x.py': 'import pytest\\npytestmark = pytest.mark.gpu\\n'}\n",  # as this file's
    "test_comment.py": "import pytest\n\n# not @pytest.mark.gpu: runs anywhere\npytestmark = pytest.mark.unit\n",
    "test_docstring.py": '"""Tests that would need pytest.mark.gpu."""\n\n\ndef test_x():\n    pass\n',
    "test_other.py": "import pytest\nother = pytest.mark.gpu\n",
}


def test_the_gpu_files_are_those_under_tests_gpu_and_those_that_apply_the_mark(tmp_path):
    (tmp_path / "tests" / "gpu").mkdir(parents=True)
    (tmp_path / "tests" / "unit").mkdir()
    (tmp_path / "tests" / "gpu" / "test_b.py").write_text("x = 1\n")
    for name, text in {**MARKED, **UNMARKED}.items():
        (tmp_path / "tests" / "unit" / name).write_text(text)
    assert gpu_tests.gpu_test_files(tmp_path) == [
        "tests/gpu/test_b.py",
        *(f"tests/unit/{name}" for name in sorted(MARKED)),
    ]
    assert not [name for name, text in UNMARKED.items() if gpu_tests.applies_gpu_mark(text)]
    here = gpu_tests.gpu_test_files()  # this repository: this file's fixtures name the mark, in strings
    assert "tests/gpu/test_cuda.py" in here and "tests/unit/test_gpu_tests.py" not in here
