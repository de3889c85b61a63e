"""A base install (`pip install -e .`, no `onnx` extra) trains: the README's first command."""

import subprocess
import sys


def test_training_imports_nothing_of_the_onnx_extra(tmp_path):
    # The onnx extra's modules made unimportable, as on a machine that installed only the base.
    code = (
        "import sys\n"
        "for m in ('onnx_ir', 'onnx', 'onnxscript', 'onnxruntime'): sys.modules[m] = None\n"
        "from fewbits.cli import main\n"
        f"sys.exit(main(['train', '--net', 'mnist_binary_connect_lenet', '--dataset', 'digits',"
        f" '-i', '1', '-v', '1', '--no-first-validation', '-m', {str(tmp_path / 'r')!r}]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "r" / "model_final.pt").exists()
