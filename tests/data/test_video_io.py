"""Decoding: frame resampling by timestamps, audio mixing/resampling, windows, bad files."""

import numpy as np
import pytest

from cmvt_jax.data import video_io
from tests.data import media


def _decode(path, **kwargs):
  return video_io.decode_video(path, **{"fps": 5, "short_side": 32, "sample_rate": 16000, **kwargs})


def _dominant_frequencies(waveform, sample_rate, count):
  spectrum = np.abs(np.fft.rfft(waveform))
  bins = np.argsort(spectrum)[-count:]
  return sorted(np.fft.rfftfreq(len(waveform), 1 / sample_rate)[bins])


def test_h264_aac_frames_resampled_and_audio_to_mono_16k(tmp_path):
  # 3 s at 10 fps (frames 0..29); stereo 48 kHz with a different tone per channel.
  path = tmp_path / "clip.mp4"
  left, right = media.tone(3.0, 48000, 440.0), media.tone(3.0, 48000, 1000.0)
  media.write_video(
    path,
    num_frames=30,
    fps=10,
    audio=np.concatenate([left, right]),
    sample_rate=48000,
    audio_layout="stereo",
  )

  video = _decode(path)

  assert video.frames.shape == (15, 32, 48, 3)  # 3 s at 5 fps, short side 32 (aspect 2:3)
  # Output frame k is on screen at k / 5 s: source frame 2k.
  assert [media.frame_index(frame) for frame in video.frames] == list(range(0, 30, 2))
  assert video.sample_rate == 16000 and video.audio.dtype == np.float32
  assert video.audio.shape == (3 * 16000,)
  assert video.duration == pytest.approx(3.0)
  assert not video.truncated
  # Both channels' tones survive the mix to mono.
  middle = video.audio[8000:40000]
  assert _dominant_frequencies(middle, 16000, 2) == pytest.approx([440.0, 1000.0], abs=1.0)


def test_variable_frame_rate_is_resampled_by_timestamps(tmp_path):
  path = tmp_path / "vfr.mkv"
  times = [0.0, 0.1, 0.5, 0.55, 1.2, 1.3, 1.95]
  media.write_video(path, num_frames=len(times), frame_times=times, audio=media.tone(2.0, 16000))

  video = _decode(path, fps=10)

  # Frame on screen at k / 10 s = the last frame whose time is <= k / 10 (by hand).
  expected = [0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3, 4, 5, 5, 5, 5, 5, 5, 5]
  assert [media.frame_index(frame) for frame in video.frames] == expected


@pytest.mark.parametrize(
  "suffix, codec, audio_codec, sample_rate",
  [
    (".webm", "libvpx-vp9", "libopus", 48000),
    (".avi", "mpeg4", "mp3", 44100),
    (".mkv", "libx264", "aac", 44100),
  ],
)
def test_other_codecs_and_containers(tmp_path, suffix, codec, audio_codec, sample_rate):
  path = tmp_path / f"clip{suffix}"
  media.write_video(
    path,
    num_frames=20,
    fps=10,
    size=(30, 46),
    codec=codec,
    audio=media.tone(2.0, sample_rate, channels=2),
    sample_rate=sample_rate,
    audio_codec=audio_codec,
    audio_layout="stereo",
  )

  video = _decode(path)

  assert video.frames.shape == (10, 32, 49, 3)  # odd size: 30x46 scaled by 32/30
  assert video.audio.shape == (32000,)
  indices = [media.frame_index(frame) for frame in video.frames]
  assert indices[0] == 0 and indices == sorted(indices) and indices[-1] >= 17
  assert _dominant_frequencies(video.audio[4000:28000], 16000, 1) == pytest.approx([440.0], abs=1.0)


def test_clip_starts_by_hand():
  assert video_io.clip_starts(10.0, 4.0, 3.0) == [0.0, 3.0, 6.0]
  assert video_io.clip_starts(10.0, 2.0, 2.0) == [0.0, 2.0, 4.0, 6.0, 8.0]
  assert video_io.clip_starts(4.0, 4.0, 1.0) == [0.0]
  assert video_io.clip_starts(3.9, 4.0, 1.0) == []
  with pytest.raises(ValueError, match="positive"):
    video_io.clip_starts(10.0, 2.0, 0.0)


def test_iter_clips_aligns_frames_and_audio(tmp_path):
  path = tmp_path / "clip.mp4"
  media.write_video(path, num_frames=50, fps=10, audio=media.tone(5.0, 16000))
  video = _decode(path)  # 25 frames, 80000 samples

  clips = list(video_io.iter_clips(video, clip_seconds=2.0, stride_seconds=1.5))

  assert [clip.start for clip in clips] == [0.0, 1.6, 3.0]  # 1.5 s moves to frame time 1.6 s
  for clip in clips:
    first = round(clip.start * 5)
    np.testing.assert_array_equal(clip.frames, video.frames[first : first + 10])
    sample = round(clip.start * 16000)
    np.testing.assert_array_equal(clip.audio, video.audio[sample : sample + 32000])


def test_zero_length_file(tmp_path):
  path = tmp_path / "empty.mp4"
  path.write_bytes(b"")
  with pytest.raises(video_io.EmptyVideoError, match="empty.mp4"):
    _decode(path)


def test_random_bytes(tmp_path):
  path = tmp_path / "noise.mp4"
  path.write_bytes(np.random.default_rng(0).bytes(20000))
  with pytest.raises(video_io.UnreadableVideoError, match="noise.mp4"):
    _decode(path)


def test_missing_file(tmp_path):
  with pytest.raises(video_io.UnreadableVideoError, match="does not exist"):
    _decode(tmp_path / "absent.mp4")


def test_audio_only_file(tmp_path):
  path = tmp_path / "sound.mp4"
  media.write_video(path, num_frames=0, audio=media.tone(2.0, 16000))
  with pytest.raises(video_io.NoVideoStreamError):
    _decode(path)


def test_video_without_audio(tmp_path):
  path = tmp_path / "silent.mp4"
  media.write_video(path, num_frames=20, fps=10)
  with pytest.raises(video_io.NoAudioStreamError, match="silent.mp4"):
    _decode(path)
  video = _decode(path, require_audio=False)
  assert video.audio is None and video.frames.shape[0] == 10


def test_frame_too_large(tmp_path):
  path = tmp_path / "big.mp4"
  media.write_video(path, num_frames=2, size=(64, 64), audio=media.tone(1.0, 16000))
  with pytest.raises(video_io.FrameTooLargeError, match="64x64"):
    _decode(path, max_frame_pixels=32 * 32)


def test_truncated_file_keeps_its_decodable_part(tmp_path):
  # moov in front (faststart), so a cut file still opens; the tail of the data is gone.
  path = tmp_path / "cut.mp4"
  media.write_video(
    path,
    num_frames=60,
    fps=10,
    audio=media.tone(6.0, 16000),
    container_options={"movflags": "+faststart"},
  )
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])

  video = _decode(path)

  assert video.truncated and "declared" in video.truncation_detail
  assert 0 < video.duration < 5.0
  assert len(video.frames) == round(video.duration * 5)
  assert len(video.audio) == round(video.duration * 16000)
  # The frames kept are the file's own frames, in order.
  assert [media.frame_index(f) for f in video.frames] == list(range(0, 2 * len(video.frames), 2))
