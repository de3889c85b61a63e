"""The seed's entry point: ``python classification.py [flags]`` = ``fewbits train [flags]``.

Every flag of the seed example's ``classification.py`` works with the same meaning, e.g.

    python classification.py -c cudnn --net cifar10_fp_connect_resnet23_prediction \\
        --monitor-path monitor.fpcon --model-save-path monitor.fpcon -d 0

and ``torchrun --nproc_per_node N classification.py ...`` trains data-parallel.
See ``python classification.py --help`` for the rest.
"""

import sys

from fewbits.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], prog="classification.py"))
