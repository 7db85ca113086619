"""Array backend selection: NumPy everywhere, CuPy where installed with a GPU."""

import numpy as np
import pytest

from inline.backend import BackendUnavailable, cupy_available, fft_module, get_array_module, is_cupy, require_cupy, to_device, to_host


def test_numpy_arrays_choose_numpy_and_scipy_fft():
    import scipy.fft

    x = np.zeros(4, np.complex64)
    assert get_array_module(x) is np and not is_cupy(x)
    assert fft_module(np) is scipy.fft
    assert to_host(x) is x


@pytest.mark.skipif(cupy_available(), reason="this machine has CuPy and a GPU: the GPU test below runs instead")
def test_without_cupy_the_error_says_why():
    with pytest.raises(BackendUnavailable, match="CuPy with a CUDA device is not available"):
        require_cupy()
    with pytest.raises(BackendUnavailable):
        to_device(np.zeros(3))


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA device (gpu extra on a GPU host)")
def test_round_trip_through_the_device():
    x = (np.arange(12) + 1j).astype(np.complex64).reshape(3, 4)
    d = to_device(x)
    assert is_cupy(d) and get_array_module(d).__name__ == "cupy"
    np.testing.assert_array_equal(to_host(d), x)
