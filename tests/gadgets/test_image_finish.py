"""ImageFinish: stored values and scaling, ISMRMRD header fields, MRD meta."""

import ismrmrd
import numpy as np
import pytest
from chain_helpers import context, make_header, payloads, run_chain
from pydantic import ValidationError

from gadgets.image_finish import ImageFinish
from inline.buffers import AcquisitionIndex, ImageBuffer
from inline.trace import Trace


def reference_header() -> ismrmrd.AcquisitionHeader:
    h = ismrmrd.AcquisitionHeader()
    h.measurement_uid = 4711
    h.position = (1.5, -2.0, 30.25)
    h.read_dir = (0.0, 1.0, 0.0)
    h.phase_dir = (1.0, 0.0, 0.0)
    h.slice_dir = (0.0, 0.0, -1.0)
    h.patient_table_position = (0.0, 0.0, -1200.0)
    h.acquisition_time_stamp = 123456
    h.physiology_time_stamp = (11, 22, 33)
    return h


def image_buffer(data: np.ndarray, **index) -> ImageBuffer:
    return ImageBuffer(
        data=data,
        index=AcquisitionIndex(**index),
        header=reference_header(),
        field_of_view_mm=(300.0, 250.0, 6.0),
        history=["FFT", "RSS"],
    )


def finish(**params) -> ImageFinish:
    return ImageFinish(context(make_header()), ImageFinish.Params(**params))


def ramp(z=1, y=16, x=20) -> np.ndarray:
    return np.linspace(0, 10, z * y * x, dtype=np.float32).reshape(1, z, y, x)


def test_header_fields_and_index_counter():
    g = finish(image_series_index=7)
    t = Trace(5, 9)
    out = run_chain(
        [g],
        [(image_buffer(ramp(), slice=3, contrast=1, phase=2, repetition=4, set=5), t), image_buffer(ramp(), slice=4)],
    )
    (first, trace), (second, _) = out
    assert trace == t
    assert isinstance(first, ismrmrd.Image)
    assert first.measurement_uid == 4711
    np.testing.assert_allclose(first.position[:], (1.5, -2.0, 30.25))
    np.testing.assert_allclose(first.read_dir[:], (0, 1, 0))
    np.testing.assert_allclose(first.phase_dir[:], (1, 0, 0))
    np.testing.assert_allclose(first.slice_dir[:], (0, 0, -1))
    np.testing.assert_allclose(first.patient_table_position[:], (0, 0, -1200))
    assert first.acquisition_time_stamp == 123456
    assert list(first.physiology_time_stamp) == [11, 22, 33]
    np.testing.assert_allclose(first.field_of_view[:], (300.0, 250.0, 6.0))
    assert list(first.matrix_size) == [20, 16, 1]
    assert (first.slice, first.contrast, first.phase, first.repetition, first.set) == (3, 1, 2, 4, 5)
    assert first.image_type == ismrmrd.IMTYPE_MAGNITUDE
    assert first.image_series_index == second.image_series_index == 7
    assert (first.image_index, second.image_index) == (1, 2)
    assert second.slice == 4
    assert first.data_type == ismrmrd.DATATYPE_USHORT and first.data.dtype == np.uint16


def test_meta():
    (image,) = payloads(run_chain([finish(series_description="t1 test")], [image_buffer(ramp())]))
    meta = ismrmrd.Meta.deserialize(image.attribute_string)
    assert meta["DataRole"] == "Image"
    assert meta["ImageProcessingHistory"] == ["FFT", "RSS", "MAGNITUDE"]
    assert meta["SeriesDescription"] == "t1 test"
    top = float(image.data.max())
    assert float(meta["WindowWidth"]) == top
    assert float(meta["WindowCenter"]) == top / 2


def test_ushort_autoscale_once_per_series_and_clip():
    g = finish()
    first = ramp()
    (a, b) = payloads(run_chain([g], [image_buffer(first), image_buffer(3 * first)]))
    p99 = np.percentile(first, 99)
    assert g.series_scale == pytest.approx(2048 / p99)
    np.testing.assert_array_equal(a.data, np.clip(np.rint(first * np.float32(g.series_scale)), 0, 4095))
    assert np.percentile(a.data, 99) == pytest.approx(2048, abs=1)
    assert b.data.max() == 4095  # the second image reuses the scale and clips at 12 bits
    np.testing.assert_array_equal(b.data[b.data < 4095], np.rint(3 * first * np.float32(g.series_scale))[b.data < 4095])


def test_fixed_scale_full_range_and_short():
    (a,) = payloads(run_chain([finish(scale=1000.0, max_intensity=65535)], [image_buffer(ramp())]))
    assert a.data.max() == 10000
    (s,) = payloads(run_chain([finish(data_type="short", scale=10.0)], [image_buffer(ramp())]))
    assert s.data.dtype == np.int16 and s.data_type == ismrmrd.DATATYPE_SHORT and s.data.max() == 100


def test_float_is_plain_magnitude():
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((1, 1, 8, 8)) + 1j * rng.standard_normal((1, 1, 8, 8))).astype(np.complex64)
    (image,) = payloads(run_chain([finish(data_type="float")], [image_buffer(data)]))
    assert image.data.dtype == np.float32 and image.data_type == ismrmrd.DATATYPE_FLOAT
    np.testing.assert_allclose(image.data, np.abs(data), rtol=1e-6)
    (scaled,) = payloads(run_chain([finish(data_type="float", scale=2.0)], [image_buffer(data)]))
    np.testing.assert_allclose(scaled.data, 2 * np.abs(data), rtol=1e-6)


def test_3d_image_has_matrix_z():
    (image,) = payloads(run_chain([finish()], [image_buffer(ramp(z=5))]))
    assert list(image.matrix_size) == [20, 16, 5]
    assert image.data.shape == (1, 5, 16, 20)


def test_empty_first_image_does_not_divide_by_zero():
    g = finish()
    (image,) = payloads(run_chain([g], [image_buffer(np.zeros((1, 1, 4, 4), np.float32))]))
    assert g.series_scale == 1.0 and image.data.max() == 0


def test_param_validation_and_bad_shape():
    with pytest.raises(ValidationError, match="exceeds"):
        ImageFinish.Params(data_type="short", max_intensity=40000)
    with pytest.raises(ValidationError):
        ImageFinish.Params(data_type="double")
    with pytest.raises(ValidationError):
        ImageFinish.Params(unknown=1)
    with pytest.raises(ValueError, match="channels, z, y, x"):
        run_chain([finish()], [image_buffer(np.ones((4, 4), np.float32))])
