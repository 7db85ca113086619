"""Process tuning: glibc takes the allocator settings; BLAS is single-threaded afterwards."""

import platform

import pytest
from threadpoolctl import threadpool_info

from inline.allocator import tune_process


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's; other C libraries keep their defaults")
def test_tune_process_is_taken_and_idempotent():
    assert tune_process() is True
    assert tune_process() is True
    blas = [p for p in threadpool_info() if p["user_api"] == "blas"]
    assert blas and all(p["num_threads"] == 1 for p in blas)
