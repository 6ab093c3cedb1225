"""Decoding video files with PyAV: frames at a target fps and size, mono audio, clip windows.

Conventions:
  * Time zero is the presentation time of the first decoded video frame. Audio is placed on the
    same timeline by its own timestamps (zero-padded in front when it starts later, trimmed
    when it starts earlier), so a clip's frames and samples cover the same seconds.
  * Frames are resampled by timestamps, which is safe for variable frame rate files: output
    frame k is the source frame on screen at time k / fps (the last one whose presentation time
    is <= k / fps). Frames are resized so that their short side is `short_side` pixels.
  * Audio is mixed down to mono and resampled by `av.AudioResampler`; samples are float32 in
    [-1, 1], sample j at time j / sample_rate.

Bad files raise a `VideoReadError` subclass whose `reason` is a short phrase for summaries.
A file that stops decoding early (truncated) is not an error: `DecodedVideo.truncated` says so
and only its decodable part is returned.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import av
import numpy as np
from av.video import reformatter
from etils import epath

# Timestamps are compared with this slack (seconds) so that a frame stamped at exactly k / fps
# is not lost to float rounding of container time bases.
_TIME_EPSILON = 1e-4
# A stream that decodes to less than its declared duration by more than this (seconds, on top
# of two frame intervals) is reported as truncated.
_TRUNCATION_TOLERANCE_S = 0.25
# Frames larger than this are refused instead of decoded (a corrupt or hostile header can
# claim a frame size that would exhaust memory). 8192 x 8192 admits 8K video.
DEFAULT_MAX_FRAME_PIXELS = 8192 * 8192


class VideoReadError(Exception):
  """A video file that cannot be used. `reason` is a short phrase used to group skips."""

  reason = "unreadable"

  def __init__(self, path: epath.PathLike, detail: str):
    self.path = path
    self.detail = detail
    super().__init__(f"{path}: {self.reason}: {detail}")


class UnreadableVideoError(VideoReadError):
  """The file is not a media file PyAV/FFmpeg can open, or its streams cannot be decoded."""

  reason = "unreadable"


class MissingVideoError(UnreadableVideoError):
  """There is no file at the path (an annotation list names a file never downloaded)."""

  reason = "missing"


class EmptyVideoError(VideoReadError):
  """The file has zero bytes or no decodable video frame."""

  reason = "empty"


class NoVideoStreamError(VideoReadError):
  """The file has no video stream (e.g. an audio-only file)."""

  reason = "no video stream"


class NoAudioStreamError(VideoReadError):
  """The file has no (decodable) audio stream while audio was required."""

  reason = "no audio stream"


class FrameTooLargeError(VideoReadError):
  """The video's frames exceed the pixel limit."""

  reason = "frame too large"


class TooShortError(VideoReadError):
  """The decodable part of the file is shorter than one clip."""

  reason = "shorter than one clip"


class SegmentOutsideError(VideoReadError):
  """A segment to cut out of the file starts at or after the end of its usable part."""

  reason = "segment outside the file"


# Every kind of file this module refuses (summaries count skips by their `reason`).
READ_ERRORS = (
  UnreadableVideoError,
  MissingVideoError,
  EmptyVideoError,
  NoVideoStreamError,
  NoAudioStreamError,
  FrameTooLargeError,
  TooShortError,
  SegmentOutsideError,
)


@dataclasses.dataclass(frozen=True)
class DecodedVideo:
  """A decoded file on a common timeline (see module docstring).

  Attributes:
    frames: `[N, H, W, 3]` uint8 RGB; frame k is the picture shown at time k / fps.
    fps: frames per second of `frames`.
    audio: `[S]` float32 mono in [-1, 1] at `sample_rate`, or None when the file has no audio
      stream (and audio was not required). S == round(duration * sample_rate).
    sample_rate: samples per second of `audio`.
    duration: seconds covered by both `frames` and `audio` (the usable length).
    truncated: the file stopped decoding before its declared end; `truncation_detail` says how.
    truncation_detail: empty unless `truncated`.
  """

  frames: np.ndarray
  fps: float
  audio: np.ndarray | None
  sample_rate: int
  duration: float
  truncated: bool
  truncation_detail: str = ""


@dataclasses.dataclass(frozen=True)
class Clip:
  """One clip window of a decoded file.

  Attributes:
    start: seconds from the start of the file; a multiple of 1 / fps.
    frames: `[round(clip_seconds * fps), H, W, 3]` uint8.
    audio: `[round(clip_seconds * sample_rate)]` float32, or None for a file without audio.
  """

  start: float
  frames: np.ndarray
  audio: np.ndarray | None


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
  """(height, width) scaled so that the shorter side is `short_side`, aspect kept."""
  scale = short_side / min(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def clip_starts(duration: float, clip_seconds: float, stride_seconds: float) -> list[float]:
  """Start times of the windows [s, s + clip_seconds) that lie wholly inside [0, duration).

  Windows start at 0, stride_seconds, 2 * stride_seconds, ...; a remainder shorter than one
  clip at the end is dropped.
  """
  if clip_seconds <= 0 or stride_seconds <= 0:
    raise ValueError(
      f"clip_seconds and stride_seconds must be positive, got {clip_seconds} and {stride_seconds}."
    )
  if duration + _TIME_EPSILON < clip_seconds:
    return []
  count = math.floor((duration - clip_seconds + _TIME_EPSILON) / stride_seconds) + 1
  return [i * stride_seconds for i in range(count)]


def iter_clips(video: DecodedVideo, clip_seconds: float, stride_seconds: float) -> Iterator[Clip]:
  """Cuts `video` into clip windows (see `clip_starts`), frames and audio aligned.

  A start that is not a multiple of 1 / fps is moved to the nearest frame time (which is then
  the clip's `start`), so that the audio span matches the frames exactly.
  """
  num_frames = round(clip_seconds * video.fps)
  num_samples = round(clip_seconds * video.sample_rate)
  for start in clip_starts(video.duration, clip_seconds, stride_seconds):
    first_frame = round(start * video.fps)
    if first_frame + num_frames > len(video.frames):
      break
    start = first_frame / video.fps
    audio = None
    if video.audio is not None:
      first_sample = round(start * video.sample_rate)
      audio = video.audio[first_sample : first_sample + num_samples]
      if len(audio) < num_samples:
        break
    yield Clip(
      start=start, frames=video.frames[first_frame : first_frame + num_frames], audio=audio
    )


def cut(video: DecodedVideo, start: float, end: float, path: epath.PathLike) -> DecodedVideo:
  """The part [start, end) of a decoded file, from the first frame at or after `start` to
  the last frame before `end` (or the end of the usable part, when `end` lies beyond it).

  The result's time zero is its first frame, frame `cut_offset(video, start)` of the file;
  its audio covers exactly its frames.

  Raises:
    SegmentOutsideError: `start` is at or after the end of the usable part.
  """
  first = cut_offset(video, start)
  last = min(math.floor(end * video.fps + _TIME_EPSILON), len(video.frames))
  if first >= last:
    raise SegmentOutsideError(
      path, f"the segment [{start:g}, {end:g}) s starts after the usable {video.duration:.2f} s"
    )
  audio = None
  if video.audio is not None:
    first_sample = round(first / video.fps * video.sample_rate)
    audio = video.audio[
      first_sample : first_sample + round((last - first) / video.fps * video.sample_rate)
    ]
  return dataclasses.replace(
    video, frames=video.frames[first:last], audio=audio, duration=(last - first) / video.fps
  )


def cut_offset(video: DecodedVideo, start: float) -> int:
  """The frame where `cut(video, start, ...)` begins: the first at or after `start`."""
  return math.ceil(start * video.fps - _TIME_EPSILON)


def decode_video(
  path: epath.PathLike,
  *,
  fps: float,
  short_side: int,
  sample_rate: int,
  require_audio: bool = True,
  max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
) -> DecodedVideo:
  """Decodes a whole file: frames at `fps` with short side `short_side`, mono audio.

  Args:
    path: the video file (any `etils.epath` path, e.g. local or gs://).
    fps: output frames per second.
    short_side: output frames' shorter side, in pixels.
    sample_rate: output audio sample rate.
    require_audio: raise `NoAudioStreamError` for a file without audio; when False such a
      file decodes with `audio=None`.
    max_frame_pixels: refuse frames with more pixels than this (`FrameTooLargeError`).

  Returns:
    The decoded file; only its decodable part when truncated.

  Raises:
    VideoReadError: one of its subclasses, naming the file and what is wrong with it.
  """
  with VideoStream(
    path,
    fps=fps,
    short_side=short_side,
    sample_rate=sample_rate,
    require_audio=require_audio,
    max_frame_pixels=max_frame_pixels,
  ) as stream:
    chunks = list(stream.frames(chunk_frames=1024))
  end = stream.end
  return DecodedVideo(
    frames=np.concatenate(chunks)[: end.num_frames],
    fps=fps,
    audio=end.audio,
    sample_rate=sample_rate,
    duration=end.duration,
    truncated=end.truncated,
    truncation_detail=end.truncation_detail,
  )


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
  """`samples` `[S]` cut (a view: an hour of audio is not copied) or zero-padded to `length`."""
  if len(samples) >= length:
    return samples[:length]
  return np.pad(samples, (0, length - len(samples)))


def decode_audio(path: epath.PathLike, *, sample_rate: int) -> np.ndarray:
  """The first audio stream of any media file (a video's soundtrack, wav, mp3, flac, ...):
  `[S]` float32 mono in [-1, 1] at `sample_rate`, time zero at its first sample.

  Raises:
    VideoReadError: the file cannot be read or has no decodable audio.
  """
  path = epath.Path(path)
  try:
    if not path.exists():
      raise MissingVideoError(path, "file does not exist")
    with path.open("rb") as file:
      try:
        container = av.open(file)
      except (av.FFmpegError, UnicodeDecodeError) as error:
        raise UnreadableVideoError(path, f"FFmpeg cannot open it ({error})") from error
      with container:
        if not container.streams.audio:
          raise NoAudioStreamError(path, "the file has no audio stream")
        audio = _AudioCollector(sample_rate)
        try:
          for packet in container.demux(container.streams.audio[0]):
            for frame in packet.decode():
              audio.add(frame)
        except av.FFmpegError:
          pass  # keep what decoded, as `decode_video` does with a truncated file
        waveform = audio.waveform(audio.start_time or 0.0)
  except OSError as error:
    raise UnreadableVideoError(path, f"cannot read the file ({error})") from error
  if waveform is None:
    raise NoAudioStreamError(path, "the audio stream has no decodable sample")
  return waveform


@dataclasses.dataclass(frozen=True)
class StreamEnd:
  """What a `VideoStream` knows once every frame has been read.

  Attributes:
    num_frames: usable frames (the first `num_frames` of those the stream yielded; it may
      have yielded a few more, past the end of a shorter audio stream).
    audio: `[round(duration * sample_rate)]` float32 mono, or None (no audio stream).
    duration: num_frames / fps seconds.
    truncated, truncation_detail: as `DecodedVideo`'s.
  """

  num_frames: int
  audio: np.ndarray | None
  duration: float
  truncated: bool
  truncation_detail: str = ""


class VideoStream:
  """A file decoded as it is read, its frames handed out in chunks (host memory: one chunk).

    with VideoStream(path, fps=8, short_side=32, sample_rate=16000) as stream:
      stream.declared_seconds          # the headers' duration (None if they do not say)
      for chunk in stream.frames(chunk_frames=256):   # [n <= 256, H, W, 3] uint8
        ...
      stream.end                       # StreamEnd: usable frame count, audio, duration

  Frames, audio and the usable length are exactly those of `decode_video` (which is this,
  collected). Opening raises the `VideoReadError`s a file's headers reveal (no video stream,
  no audio stream when required, frames too large); `frames` raises those decoding reveals.
  """

  def __init__(
    self,
    path: epath.PathLike,
    *,
    fps: float,
    short_side: int,
    sample_rate: int,
    require_audio: bool = True,
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
  ):
    if fps <= 0 or short_side <= 0 or sample_rate <= 0:
      raise ValueError(
        f"fps, short_side and sample_rate must be positive, got {fps}, {short_side}, {sample_rate}."
      )
    self.path = epath.Path(path)
    self._fps, self._short_side, self._sample_rate = fps, short_side, sample_rate
    self._require_audio = require_audio
    self._max_frame_pixels = max_frame_pixels
    self._file = self._container = None
    self.declared_seconds: float | None = None
    self.end: StreamEnd | None = None

  def __enter__(self) -> VideoStream:
    try:
      if not self.path.exists():
        raise MissingVideoError(self.path, "file does not exist")
      if self.path.stat().length == 0:
        raise EmptyVideoError(self.path, "file has zero bytes")
      self._file = self.path.open("rb")
      try:
        self._container = av.open(self._file)
      # PyAV also reads the container's metadata tags, as UTF-8.
      except (av.FFmpegError, UnicodeDecodeError) as error:
        raise UnreadableVideoError(self.path, f"FFmpeg cannot open it ({error})") from error
      self._check_streams()
    except OSError as error:  # permissions, a vanished file, a network read that failed
      self.__exit__(None, None, None)
      raise UnreadableVideoError(self.path, f"cannot read the file ({error})") from error
    except VideoReadError:
      self.__exit__(None, None, None)
      raise
    return self

  def __exit__(self, *exc_info) -> None:
    if self._container is not None:
      self._container.close()
    if self._file is not None:
      self._file.close()
    self._file = self._container = None

  def _check_streams(self) -> None:
    container, path = self._container, self.path
    if not container.streams.video:
      raise NoVideoStreamError(path, "the file has no video stream")
    self._video_stream = container.streams.video[0]
    self._audio_stream = container.streams.audio[0] if container.streams.audio else None
    if self._audio_stream is None and self._require_audio:
      raise NoAudioStreamError(
        path,
        "the file has no audio stream (keep such files with silence by allowing "
        "audio-less videos, e.g. prepare --keep_audioless)",
      )
    width = self._video_stream.codec_context.width
    height = self._video_stream.codec_context.height
    if width * height > self._max_frame_pixels:
      raise FrameTooLargeError(
        path, f"{width}x{height} frames exceed the limit of {self._max_frame_pixels} pixels"
      )
    self.declared_seconds = _declared_end(container, self._video_stream, 0.0)

  def frames(self, chunk_frames: int) -> Iterator[np.ndarray]:
    """Output frames in order, `[n, H, W, 3]` uint8 with 1 <= n <= chunk_frames; `end` is
    set when the iteration finishes."""
    if self._container is None:
      raise RuntimeError("VideoStream.frames needs an open stream: use `with VideoStream(...)`.")
    try:
      yield from self._decode(chunk_frames)
    except OSError as error:
      raise UnreadableVideoError(self.path, f"cannot read the file ({error})") from error

  def _decode(self, chunk_frames: int) -> Iterator[np.ndarray]:
    path, fps, sample_rate = self.path, self._fps, self._sample_rate
    video_stream, audio_stream = self._video_stream, self._audio_stream
    frames = _FrameSampler(fps, self._short_side)
    audio = _AudioCollector(sample_rate) if audio_stream is not None else None
    streams = [video_stream] + ([audio_stream] if audio_stream is not None else [])
    decode_error = ""
    try:
      for packet in self._container.demux(streams):
        for frame in packet.decode():
          if isinstance(frame, av.VideoFrame):
            frames.add(frame, video_stream)
            if frames.pending >= chunk_frames:
              yield frames.take(chunk_frames)
          else:
            audio.add(frame)
    except av.FFmpegError as error:
      decode_error = f"decoding stopped with an error ({error})"
    if frames.count == 0:
      if decode_error:
        raise UnreadableVideoError(path, f"no video frame could be decoded: {decode_error}")
      raise EmptyVideoError(path, "the video stream has no decodable frame")

    frame_interval = frames.typical_interval(video_stream)
    video_end = frames.end_time(frame_interval)
    declared_video_end = _declared_end(self._container, video_stream, frames.first_time)
    usable_end = video_end
    stream_report = [f"video decoded to {video_end:.2f} s"]
    if declared_video_end is not None:
      stream_report[-1] += f" of {declared_video_end:.2f} s declared"

    waveform = audio.waveform(frames.first_time) if audio is not None else None
    if audio is not None and waveform is None and self._require_audio:
      detail = f" ({decode_error})" if decode_error else ""
      raise NoAudioStreamError(path, f"the audio stream has no decodable sample{detail}")
    if waveform is not None:
      declared_audio_end = _declared_end(self._container, audio_stream, frames.first_time)
      audio_end = len(waveform) / sample_rate
      if declared_audio_end is not None and audio_end > declared_audio_end:
        # Codecs pad their last frame (AAC: up to 1024 samples); the header says where the
        # real signal ends.
        audio_end = declared_audio_end
      stream_report.append(f"audio decoded to {audio_end:.2f} s")
      if declared_audio_end is not None:
        stream_report[-1] += f" of {declared_audio_end:.2f} s declared"
        if audio_end < declared_audio_end - _TRUNCATION_TOLERANCE_S - 2 * frame_interval:
          decode_error = decode_error or "the audio stream ends before its declared end"
      usable_end = min(usable_end, audio_end)
    if (
      declared_video_end is not None
      and video_end < declared_video_end - _TRUNCATION_TOLERANCE_S - 2 * frame_interval
    ):
      decode_error = decode_error or "the video stream ends before its declared end"

    num_frames = math.floor(usable_end * fps + _TIME_EPSILON)
    if num_frames == 0:
      raise EmptyVideoError(path, f"the usable part is shorter than one frame at {fps} fps")
    frames.finish(num_frames)
    while frames.pending:
      yield frames.take(chunk_frames)
    duration = num_frames / fps
    if waveform is not None:
      num_samples = round(duration * sample_rate)
      waveform = fit_length(waveform, num_samples)
    self.end = StreamEnd(
      num_frames=num_frames,
      audio=waveform,
      duration=duration,
      truncated=bool(decode_error),
      truncation_detail=f"{decode_error}; {', '.join(stream_report)}" if decode_error else "",
    )


def _declared_end(container, stream, time_zero: float) -> float | None:
  """The stream's end on the common timeline according to the headers, if they say."""
  if stream.duration is not None and stream.time_base is not None:
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    return start + float(stream.duration * stream.time_base) - time_zero
  if container.duration is not None:
    start = container.start_time / av.time_base if container.start_time is not None else 0.0
    return start + container.duration / av.time_base - time_zero
  return None


class _FrameSampler:
  """Keeps, from frames arriving in presentation order, those on screen at k / fps.

  Only frames that are selected are converted to RGB at the output size, so a 60 fps source
  sampled at 8 fps converts 8 frames per second.
  """

  def __init__(self, fps: float, short_side: int):
    self._fps = fps
    self._short_side = short_side
    self._pending: list[np.ndarray] = []  # selected frames not yet taken
    self._emitted = 0  # frames selected so far
    self._previous = None  # (time, av.VideoFrame) of the last frame seen
    self._previous_rgb = None
    # One reformatter for the whole file: it keeps its scaler between frames (creating one per
    # frame costs more than the decoding).
    self._reformatter = reformatter.VideoReformatter()
    self._times: list[float] = []
    self.first_time = 0.0
    self.count = 0

  def _time(self, frame, stream) -> float:
    if frame.pts is not None and frame.time is not None:
      return float(frame.time)
    # Some AVI streams carry no timestamps: fall back on the nominal rate.
    rate = stream.average_rate or stream.guessed_rate or 25
    return self.count / float(rate)

  def add(self, frame: av.VideoFrame, stream) -> None:
    time = self._time(frame, stream)
    if self.count == 0:
      self.first_time = time
    time -= self.first_time
    if self._times and time <= self._times[-1]:
      return  # a duplicate or out-of-order timestamp: the earlier frame stays on screen
    self._emit_until(time)
    self._previous = frame
    self._previous_rgb = None
    self._times.append(time)
    self.count += 1

  def _emit_until(self, time: float) -> None:
    """Selects the previous frame for every output time before `time`."""
    while self._previous is not None and self._emitted / self._fps < time - _TIME_EPSILON:
      if self._previous_rgb is None:
        height, width = resized_shape(self._previous.height, self._previous.width, self._short_side)
        self._previous_rgb = self._reformatter.reformat(
          self._previous, width=width, height=height, format="rgb24", interpolation="AREA"
        ).to_ndarray()
      self._pending.append(self._previous_rgb)
      self._emitted += 1

  def typical_interval(self, stream) -> float:
    """Median spacing of the frames seen (the nominal rate for a single frame)."""
    if len(self._times) > 1:
      return float(np.median(np.diff(self._times)))
    rate = stream.average_rate or stream.guessed_rate or 25
    return 1.0 / float(rate)

  def end_time(self, frame_interval: float) -> float:
    """When the last frame leaves the screen."""
    return self._times[-1] + frame_interval

  @property
  def pending(self) -> int:
    return len(self._pending)

  def take(self, count: int) -> np.ndarray:
    """The first `count` (or fewer) selected frames not taken yet, `[n, H, W, 3]` uint8."""
    taken, self._pending = self._pending[:count], self._pending[count:]
    return np.stack(taken)

  def finish(self, num_frames: int) -> None:
    """Selects the last frame for the output times left before frame `num_frames`."""
    self._emit_until(num_frames / self._fps)


class _AudioCollector:
  """Mixes audio frames to mono at the target rate and remembers where they start."""

  def __init__(self, sample_rate: int):
    self._sample_rate = sample_rate
    self._resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    self._chunks: list[np.ndarray] = []
    self.start_time = None

  def add(self, frame: av.AudioFrame) -> None:
    if self.start_time is None and frame.time is not None:
      self.start_time = float(frame.time)
    for resampled in self._resampler.resample(frame):
      self._chunks.append(resampled.to_ndarray().reshape(-1))

  def waveform(self, time_zero: float) -> np.ndarray | None:
    """`[S]` float32 on the common timeline, or None when nothing was decoded."""
    for resampled in self._resampler.resample(None):
      self._chunks.append(resampled.to_ndarray().reshape(-1))
    if not self._chunks:
      return None
    waveform = np.concatenate(self._chunks).astype(np.float32, copy=False)
    self._chunks = []  # the pieces are in `waveform` now
    offset = round(((self.start_time or 0.0) - time_zero) * self._sample_rate)
    if offset > 0:
      waveform = np.concatenate([np.zeros(offset, np.float32), waveform])
    elif offset < 0:
      waveform = waveform[-offset:]
    return waveform
