"""Property-based fuzzing of the image and mask readers: random bytes, random TIFF headers and
truncated files end in a decoded array or a one-line DatasetError, never another exception."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import read_mask
from data_files import DatasetError, read_image
from libraries import quiet_opencv

FUZZ = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_tiff() -> bytes:
    """A small, valid 3-channel 8-bit TIFF, as encoded by OpenCV."""
    ok, encoded = cv2.imencode(".tif", np.arange(24 * 24 * 3, dtype=np.uint8).reshape(24, 24, 3))
    assert ok
    return encoded.tobytes()


VALID = _valid_tiff()


def _read_both(path) -> None:
    for reader in (read_image, read_mask):
        try:
            out = reader(path)
        except DatasetError as exc:
            message = str(exc)
            assert "\n" not in message and str(path) in message  # one line, naming the file
        else:
            assert out.dtype == np.uint8 and out.ndim in (2, 3)


@pytest.fixture(autouse=True)
def _quiet():
    quiet_opencv()


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(tmp_path, data):
    path = tmp_path / "P_1.tif"
    path.write_bytes(data)
    _read_both(path)


@FUZZ
@given(header=st.sampled_from([b"II*\x00", b"MM\x00*", b"II+\x00"]), body=st.binary(max_size=1024))
def test_random_tiff_headers(tmp_path, header, body):
    path = tmp_path / "P_1.tif"
    path.write_bytes(header + body)
    _read_both(path)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(VALID) - 1), flip=st.integers(min_value=0, max_value=len(VALID) - 1))
def test_truncated_and_damaged_tiffs(tmp_path, cut, flip):
    damaged = bytearray(VALID)
    damaged[flip] ^= 0xFF
    for data in (VALID[:cut], bytes(damaged)):
        path = tmp_path / "P_1_mask.tif"
        path.write_bytes(data)
        _read_both(path)


def _opencv_log_level() -> int:
    logging = getattr(cv2.utils, "logging", None)
    return logging.getLogLevel() if logging is not None else cv2.getLogLevel()


def test_quiet_opencv_silences_the_installed_opencv():
    set_level = getattr(getattr(cv2.utils, "logging", None), "setLogLevel", None) or cv2.setLogLevel
    set_level(3)  # INFO
    assert _opencv_log_level() == 3
    quiet_opencv()
    assert _opencv_log_level() == 0  # LOG_LEVEL_SILENT


def test_quiet_opencv_uses_the_top_level_call_of_opencv_before_4_13(monkeypatch):
    """OpenCV 4.9-4.12 (within the requirements) has cv2.setLogLevel and no cv2.utils.logging."""
    levels = []
    monkeypatch.delattr(cv2.utils, "logging", raising=False)
    monkeypatch.setattr(cv2, "setLogLevel", levels.append, raising=False)
    quiet_opencv()
    assert levels == [0]
