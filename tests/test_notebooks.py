"""The notebooks in notebooks/: stored clean, lint-free, and every one runs end to end.

Each notebook is executed in a fresh Jupyter kernel with ``PATHSGD_NOTEBOOK_SMOKE=1``, which
its parameters cell (tagged ``parameters``) reads to pick tiny sizes, on two simulated CPU
devices so that the quick start's sharded path runs with a real mesh.
"""

import os
import pathlib
import subprocess
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("quickstart", "paper_reproduction", "rnn_adding_problem")
COLAB_URL = ("https://colab.research.google.com/github/pathsgd-jax/pathsgd_jax/blob/main/"
             "notebooks/{name}.ipynb")
CELL_TIMEOUT_S = 300


def read_notebook(name):
  return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def code_cells(notebook):
  return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_every_notebook_is_listed():
  assert sorted(path.stem for path in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs(name):
  notebook = read_notebook(name)
  nbformat.validate(notebook)
  for index, cell in enumerate(code_cells(notebook)):
    assert cell.outputs == [], f"{name}: code cell {index} has stored outputs"
    assert cell.execution_count is None, f"{name}: code cell {index} has an execution count"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_structure(name):
  notebook = read_notebook(name)
  first = notebook.cells[0]
  assert first.cell_type == "markdown" and COLAB_URL.format(name=name) in first.source
  assert notebook.metadata.kernelspec.name == "python3"
  cells = code_cells(notebook)
  # The install cell comes first and only installs where the package is missing.
  assert "%pip install" in cells[0].source and 'find_spec("pathsgd_jax")' in cells[0].source
  tagged = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{name}: expected one code cell tagged 'parameters'"
  assert "PATHSGD_NOTEBOOK_SMOKE" in tagged[0].source
  source = "\n".join(cell.source for cell in cells)
  assert "setup_tpu" not in source and "colab_tpu" not in source
  assert "http" not in source.replace(cells[0].source, ""), "no cell may fetch from the network"


def test_notebooks_pass_ruff():
  # The rules and the line length are in pyproject.toml ([tool.ruff], notebooks only).
  result = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
       str(NOTEBOOK_DIR)],
      cwd=NOTEBOOK_DIR.parent, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name):
  notebook = read_notebook(name)
  env = dict(os.environ)
  env.update({
      "PATHSGD_NOTEBOOK_SMOKE": "1",
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
  })
  # The kernel runs this interpreter (ipykernel's own spec), whatever kernels are installed
  # elsewhere on the machine.
  kernel_manager = AsyncKernelManager(kernel_name="python3",
                                      kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
  client = NotebookClient(notebook, km=kernel_manager, timeout=CELL_TIMEOUT_S,
                          resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  client.execute(env=env)
  errors = [output for cell in code_cells(notebook) for output in cell.outputs
            if output.output_type == "error"]
  assert not errors
  figures = [output for cell in code_cells(notebook) for output in cell.outputs
             if "image/png" in output.get("data", {})]
  assert figures, f"{name} drew no figure"
