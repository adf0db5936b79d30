"""examples/explore.ipynb runs headless from top to bottom in a kernel of this very Python, shows
the widget (explore recognised the notebook) and the static images, and its saved outputs are
the ones it makes."""

from __future__ import annotations

import json
import sys

from extras_rule import extra
from reference import REPO, repo_env

NOTEBOOK = REPO / "examples" / "explore.ipynb"
WIDGET = "application/vnd.jupyter.widget-view+json"


def outputs(notebook) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs]


def texts(notebook) -> list[str]:
    """The printed lines, without the kernel's own warnings on stderr."""
    return [line for output in outputs(notebook)
            if output.output_type == "stream" and output.name == "stdout"
            for line in output.text.splitlines()]


def test_example_notebook_runs_and_its_saved_outputs_are_its_own(tmp_path):
    extra("transformers")
    extra("ipywidgets")
    nbformat = extra("nbformat")
    nbclient = extra("nbclient")
    extra("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    # A kernel spec of its own, so that the kernel is this Python whatever else is installed.
    spec = tmp_path / "kernels" / "attn-probe-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "attn_probe tests", "language": "python",
    }))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    manager = KernelManager(kernel_name="attn-probe-test", kernel_spec_manager=specs)
    assert manager.kernel_spec.argv[0] == sys.executable

    saved = nbformat.read(NOTEBOOK, as_version=4)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(notebook, km=manager, timeout=240,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=repo_env(), cwd=str(NOTEBOOK.parent))

    assert texts(notebook)[-1] == sys.executable
    for run in (notebook, saved):
        kinds = [key for output in outputs(run) for key in output.get("data", {})]
        assert kinds.count(WIDGET) == 1  # the view, as a widget: explore saw a notebook
        assert kinds.count("image/png") == 5 and kinds.count("text/html") == 3
        assert not [o for o in outputs(run) if o.output_type == "error"]
    assert texts(notebook)[:-1] == texts(saved)
    assert "forward passes so far: 1" in texts(saved)
    assert "MaxRank@90% over 16 of 16 sequences" in texts(saved)
