"""QA session 13b: the certified VNNI epilogue's compile-time verification (integer_cert's
``_no_check``) stays bounded in memory and time on a hostile layer."""

from __future__ import annotations

import numpy as np
import pytest

import fewbits.runtime.integer_cert as cert
from fewbits.runtime.integer import INT_ISAS, _conv_args, _lib, supported_int_isas
from fewbits.runtime.integer_plan import QuantParams
from tests.test_integer_cert import _conv

F32 = np.float32
VNNI = INT_ISAS.index("avx512_vnni")


@pytest.mark.skipif("avx512_vnni" not in supported_int_isas(),
                    reason="the certified epilogue is the VNNI path's")
def test_no_check_bounds_the_matrix_of_sums_it_runs() -> None:
    # channel 0: a dead channel (gain 1e-12) whose value sits on a tie over 2^21 sums, every
    # one near a rounding boundary; 15 channels of one sum each (zero weights). The sums
    # matrix was padded to 2^21 rows x 16 channels (32M lanes, ~0.5 GB, per try)
    cout, sc = 16, 0.01
    q = QuantParams(-1.28, 1.27, 0.0, sc, 0, -128, 127, sc)
    alpha, beta = np.ones(cout), np.zeros(cout)
    alpha[0], beta[0] = 1e-12, float(F32(2.5 * sc))
    acc = np.zeros((cout, 2), np.int64)
    acc[0] = [0, 2**21]
    s, keep = _conv(cout, np.full(cout, 1e-3), np.zeros(cout), alpha, beta, False, q, acc), []
    a = _conv_args(s, VNNI, keep)
    lanes = []

    class Counting:  # the library, recording how many lanes each fbi_epi_sums call runs
        def __getattr__(self, name: str):
            return getattr(_lib(), name)

        @staticmethod
        def fbi_epi_sums(a, m, acc, y, mode):
            lanes.append(m * cout)
            return _lib().fbi_epi_sums(a, m, acc, y, mode)

    out = cert.certify(s, a, Counting())
    assert out is not None  # still certified, with the check
    assert max(lanes, default=0) <= 2**22
