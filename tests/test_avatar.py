"""Avatar assets: the built-in portrait, ``prepare`` from stills and videos, loading."""

from __future__ import annotations

import json
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest

from renderers.avatar import (
    FORMAT_VERSION,
    AvatarError,
    crop_box,
    default_avatar,
    draw_portrait,
    load_avatar,
    paste_mask,
)
from renderers.prepare import blink_closure, find_faces, main, prepare

LIPS_ROW = 71  # where the model contract expects the line between the lips, in the 96x96 crop


@pytest.fixture(scope="module")
def portrait_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("portrait") / "portrait.png"
    cv2.imwrite(str(path), draw_portrait(512, 512).image)
    return path


def lips_row(crop: np.ndarray) -> int:
    """Row of the darkest horizontal line through the crop's centre columns (the lip line)."""
    luma = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY).astype(np.float32)
    band = luma[48:92, 40:56].mean(axis=1)
    return 48 + int(np.argmin(band))


def eye_darkness(frame: np.ndarray, box) -> float:
    x, y, w, h = (int(v) for v in box)
    return float(255 - cv2.cvtColor(frame[y : y + h, x : x + w], cv2.COLOR_BGR2GRAY).min())


# ---------------------------------------------------------------- the built-in avatar


def test_default_avatar_frames_the_mouth_where_the_model_expects_it():
    avatar = default_avatar()
    assert (avatar.width, avatar.height, avatar.fps) == (512, 512, 25.0)
    assert len(avatar) == 100 and list(avatar.loop) == list(range(100))
    assert abs(lips_row(avatar.crops[0]) - LIPS_ROW) <= 3
    x0, y0, x1, y1 = avatar.boxes[0]
    assert x0 % 2 == y0 % 2 == x1 % 2 == y1 % 2 == 0
    assert abs((x0 + x1) / 2 - 256) <= 4  # centred face


def test_default_avatar_is_alive_when_idle():
    avatar = default_avatar()
    idle = avatar.idle
    assert len(idle) == 100 and idle[0].shape == (768, 512) and idle[0].dtype == np.uint8
    # breathing: frames move, and the loop closes (last frame close to the first)
    half = np.abs(idle[50].astype(int) - idle[0].astype(int)).mean()
    seam = np.abs(idle[-1].astype(int) - idle[0].astype(int)).mean()
    assert half > 0.5 and seam < half / 3
    # blinks: the eyes are much less dark in the most closed frame
    eye = draw_portrait().eyes[0]
    closed = int(np.argmax([blink_closure(i / 25, 4.0) for i in range(100)]))
    assert eye_darkness(avatar.frames[0], eye) - eye_darkness(avatar.frames[closed], eye) > 60


@pytest.mark.parametrize(("width", "height", "fps"), [(1280, 720, 10), (360, 640, 30)])
def test_default_avatar_at_other_even_sizes_and_rates(width, height, fps):
    avatar = default_avatar(width, height, fps=fps)
    assert (avatar.width, avatar.height) == (width, height)
    assert avatar.idle[0].shape == (height * 3 // 2, width)
    assert len(avatar) == 4 * fps  # a 4 s loop
    x0, y0, x1, y1 = avatar.boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width).all() and (y1 <= height).all()
    assert abs(lips_row(avatar.crops[0]) - LIPS_ROW) <= 3


def test_the_drawn_portrait_is_a_face_to_opencv():
    portrait = draw_portrait()
    (x, y, w, _), *_ = find_faces(portrait.image)
    fx, fy, fw, fh = portrait.face_box
    assert abs(x - fx) < 0.1 * fw and abs(y - fy) < 0.1 * fh and abs(w - fw) < 0.15 * fw


def test_crop_box_is_square_padded_below_and_inside_the_frame():
    x0, y0, x1, y1 = crop_box((100, 100, 200, 200), 512, 512)
    assert x1 - x0 == y1 - y0 >= 200 * 1.05
    assert y0 == 100 and y1 > 300
    x0, y0, x1, y1 = crop_box((400, 380, 120, 120), 512, 512)  # near the corner: shifted in
    assert x1 <= 512 and y1 <= 512 and x1 - x0 == y1 - y0


def test_paste_mask_covers_the_mouth_and_spares_eyes_and_border():
    mask = paste_mask()
    assert mask.shape == (96, 96) and mask.dtype == np.float32
    assert mask[LIPS_ROW, 48] > 0.99 and mask[85, 48] > 0.5
    assert mask[35, 30] < 0.05 and mask[35, 66] < 0.05  # eyes
    assert max(mask[0].max(), mask[-1].max(), mask[:, 0].max(), mask[:, -1].max()) < 0.02


# ---------------------------------------------------------------- prepare


def test_prepare_a_still_finds_the_face(portrait_png, tmp_path):
    out = tmp_path / "avatar"
    prepared = prepare(portrait_png, out, fps=25, progress=False)
    meta = json.loads((out / "avatar.json").read_text())
    assert meta["version"] == FORMAT_VERSION and meta["kind"] == "still"
    assert (meta["width"], meta["height"], meta["frames"]) == (512, 512, 100)
    loaded = load_avatar(out)
    assert np.array_equal(loaded.frames, prepared.frames)
    assert np.array_equal(loaded.boxes, prepared.boxes)
    assert len(loaded.idle) == 100 and loaded.idle[0].shape == (768, 512)
    assert abs(lips_row(loaded.crops[0]) - LIPS_ROW) <= 4
    # the detected face frames the crop like the known box of the built-in avatar
    assert np.abs(loaded.boxes[0] - default_avatar().boxes[0]).max() <= 16


def test_prepare_with_a_face_box_and_a_size(portrait_png, tmp_path):
    face_box = draw_portrait().face_box  # in the input's 512x512 pixels
    avatar = prepare(
        portrait_png,
        tmp_path / "a",
        face_box=face_box,
        size=(256, 200),
        idle_seconds=2,
        progress=False,
    )
    assert (avatar.width, avatar.height, len(avatar)) == (256, 200, 50)
    # the box was carried into the scaled, cropped frame: the lips still sit on row ~71
    assert abs(lips_row(avatar.crops[0]) - LIPS_ROW) <= 4


def test_a_large_input_is_shrunk_by_default(tmp_path):
    big = cv2.resize(draw_portrait(512, 384).image, (2000, 1500))
    avatar = prepare(big, tmp_path / "big", idle_seconds=0.4, progress=False)
    assert (avatar.width, avatar.height) == (1280, 960)
    assert abs(lips_row(avatar.crops[0]) - LIPS_ROW) <= 4


def test_prepare_command_line(portrait_png, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main([str(portrait_png), "--out", out, "--idle-seconds", "1", "-q"]) == 0
    assert "25 frames" in capsys.readouterr().out
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((300, 300, 3), 200, np.uint8))
    assert main([str(blank), "--out", str(tmp_path / "none"), "-q"]) == 2
    assert "no face found" in capsys.readouterr().err


def test_a_blank_image_has_no_face(tmp_path):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((400, 400, 3), 128, np.uint8))
    with pytest.raises(AvatarError, match=r"no face found.*--face-box"):
        prepare(blank, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unreadable_and_missing_inputs(tmp_path):
    junk = tmp_path / "photo.png"
    junk.write_bytes(b"\x00\x01 not an image " * 20)
    with pytest.raises(AvatarError, match="cannot read"):
        prepare(junk, tmp_path / "out", progress=False)
    with pytest.raises(AvatarError, match="not found"):
        prepare(tmp_path / "missing.jpg", tmp_path / "out", progress=False)


def test_prepare_a_video_ping_pongs_and_resamples_to_fps(tmp_path):
    base = draw_portrait(320, 240).image
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(50))
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(40):  # 0.8 s at 50 fps, the head sliding right
            shifted = np.roll(base, i // 4, axis=1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(shifted, format="bgr24")))
        container.mux(stream.encode(None))
    avatar = prepare(path, tmp_path / "video_avatar", fps=25, progress=False)
    assert avatar.kind == "video" and len(avatar) == 20  # 0.8 s at 25 fps
    assert list(avatar.loop) == [*range(20), *range(18, 0, -1)]
    # the crop box follows the head
    assert avatar.boxes[-1][0] > avatar.boxes[0][0]
    assert len(load_avatar(tmp_path / "video_avatar").idle) == 38


# ---------------------------------------------------------------- loading


def test_load_errors_are_explained(tmp_path):
    with pytest.raises(AvatarError, match="not found"):
        load_avatar(tmp_path / "nope")
    with pytest.raises(AvatarError, match=r"no avatar\.json.*prepare"):
        load_avatar(tmp_path)
    prepare(
        draw_portrait(128, 128).image,
        tmp_path / "a",
        draw_portrait(128, 128).face_box,
        idle_seconds=0.2,
        progress=False,
    )
    meta_path = tmp_path / "a" / "avatar.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "version": FORMAT_VERSION + 1}))
    with pytest.raises(AvatarError, match="newer version"):
        load_avatar(tmp_path / "a")
    meta_path.write_text(json.dumps({**meta, "frames": 99}))
    with pytest.raises(AvatarError, match="99 frames"):
        load_avatar(tmp_path / "a")


def test_resized_keeps_the_face_framed():
    avatar = default_avatar().resized(640, 360)
    assert avatar.idle[0].shape == (540, 640)
    x0, y0, x1, y1 = avatar.boxes[0]
    assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 360
    assert abs(lips_row(avatar.crops[0]) - LIPS_ROW) <= 4
