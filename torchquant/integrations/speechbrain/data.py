"""Spoken digits synthesised offline with espeak-ng: a keyword-spotting task with no download.

Every utterance is one word ("zero" .. "nine") spoken by one *voice*: an espeak-ng accent
(``en-us``, ``en-gb``, ``en-gb-scotland``, ...) combined with a voice variant (``+m1`` ..
``+m7``, ``+f1`` .. ``+f5``). For each voice and word the recipe draws ``takes`` renditions,
each with its own speaking rate (words per minute), pitch, placement in a one-second window
and white noise at a drawn signal-to-noise ratio. espeak-ng's 22.05 kHz output is resampled
to 16 kHz. The split is by variant: the test set's variants never speak in the training set,
so a test voice is always new (new timbre and pitch range, across every accent).

The waveforms are cached under ``<cache>/speech_digits/<hash of the recipe>/`` (``$TORCHQUANT_CACHE``,
else ``$XDG_CACHE_HOME/torchquant``, else ``~/.cache/torchquant``), so the synthesis (about
40 ms per utterance) runs once per recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DIGITS", "SpeechDigitsRecipe", "cache_root", "espeak_ng", "fbank_features", "speech_digits"]

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""The words of the default recipe; a label is the word's index."""

Split = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class SpeechDigitsRecipe:
    """How the spoken-digit set is synthesised; its hash names the cache folder.

    Attributes:
        words: the vocabulary; label ``i`` is ``words[i]``.
        accents: espeak-ng voices (``espeak-ng --voices=en`` lists them).
        train_variants: voice variants (``espeak-ng-data/voices/!v``) of the training voices.
        test_variants: variants of the test voices, disjoint from ``train_variants``.
        takes: renditions per (voice, word), each with its own rate, pitch, offset and noise.
        speed: range of speaking rates, words per minute (uniform).
        pitch: range of espeak-ng pitch settings, 0-99 (uniform).
        snr_db: range of signal-to-noise ratios of the added white noise, dB (uniform).
        sample_rate: output sample rate, Hz.
        seconds: length of every waveform; the word sits at a random offset inside it.
        seed: seed of the random draws.
    """

    words: tuple[str, ...] = DIGITS
    accents: tuple[str, ...] = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
    train_variants: tuple[str, ...] = ("m1", "m2", "m3", "m4", "f1", "f2", "f3")
    test_variants: tuple[str, ...] = ("m5", "m6", "f4")
    takes: int = 3
    speed: tuple[int, int] = (120, 200)
    pitch: tuple[int, int] = (25, 75)
    snr_db: tuple[float, float] = (5.0, 30.0)
    sample_rate: int = 16000
    seconds: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        shared = set(self.train_variants) & set(self.test_variants)
        if shared:
            raise ValueError(f"SpeechDigitsRecipe: train_variants and test_variants share {sorted(shared)}")
        if self.takes < 1 or not self.words or not self.accents or not self.train_variants or not self.test_variants:
            raise ValueError(f"SpeechDigitsRecipe: empty words/accents/variants or takes < 1 in {self}")
        for name in ("speed", "pitch", "snr_db"):
            v = getattr(self, name)
            if len(v) != 2 or not v[0] <= v[1]:
                raise ValueError(f"SpeechDigitsRecipe: {name} must be a (low, high) pair with low <= high, got {v!r}")
        if not (self.pitch[0] >= 0 and self.pitch[1] <= 99):  # espeak-ng's pitch scale
            raise ValueError(f"SpeechDigitsRecipe: pitch must lie in [0, 99], got {self.pitch!r}")
        if not self.speed[0] > 0:
            raise ValueError(f"SpeechDigitsRecipe: speed must be positive words per minute, got {self.speed!r}")
        if not (self.sample_rate > 0 and self.seconds > 0):
            raise ValueError(
                f"SpeechDigitsRecipe: sample_rate and seconds must be positive, got {self.sample_rate!r} and "
                f"{self.seconds!r}"
            )

    def key(self) -> str:
        """A 16-hex-digit hash of the recipe (the cache folder's name)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root() -> Path:
    """``$TORCHQUANT_CACHE``, else ``$XDG_CACHE_HOME/torchquant``, else ``~/.cache/torchquant``."""
    if os.environ.get("TORCHQUANT_CACHE"):
        return Path(os.environ["TORCHQUANT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "torchquant"


def espeak_ng() -> str:
    """The path of the ``espeak-ng`` program.

    Raises:
        RuntimeError: it is not on ``PATH`` (the message says how to install it).
    """
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError(
            "torchquant.integrations.speechbrain.data: espeak-ng is not on PATH; "
            "install it (Debian/Ubuntu: apt-get install espeak-ng)"
        )
    return path


def _say(exe: str, word: str, voice: str, speed: int, pitch: int, folder: str) -> tuple[Tensor, int]:
    """One word as a float waveform in [-1, 1] and its sample rate."""
    out = os.path.join(folder, "w.wav")
    cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", out, word]
    done = subprocess.run(cmd, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}, word {word!r}: {done.stderr.decode().strip()}")
    with wave.open(out) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise RuntimeError(f"espeak-ng: expected 16-bit mono, got {w.getsampwidth() * 8}-bit x{w.getnchannels()}")
        rate, frames = w.getframerate(), w.readframes(w.getnframes())
    x = torch.frombuffer(bytearray(frames), dtype=torch.int16).float() / 32768.0
    return x, rate


def _place(x: Tensor, length: int, rng: random.Random) -> Tensor:
    """Trim silence, then put ``x`` at a random offset in ``length`` samples (centre-cropped if longer)."""
    loud = (x.abs() > 0.01).nonzero()
    if len(loud):
        x = x[int(loud[0]) : int(loud[-1]) + 1]
    if len(x) >= length:
        start = (len(x) - length) // 2
        return x[start : start + length]
    out = torch.zeros(length)
    offset = rng.randint(0, length - len(x))
    out[offset : offset + len(x)] = x
    return out


def _synthesise(recipe: SpeechDigitsRecipe) -> dict:
    import torchaudio.functional as AF

    exe = espeak_ng()
    rng = random.Random(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    length = round(recipe.sample_rate * recipe.seconds)
    waves, labels, voices, test = [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for accent in recipe.accents:
            for variant in (*recipe.train_variants, *recipe.test_variants):
                voice = f"{accent}+{variant}"
                for label, word in enumerate(recipe.words):
                    for _ in range(recipe.takes):
                        speed, pitch = rng.randint(*recipe.speed), rng.randint(*recipe.pitch)
                        x, rate = _say(exe, word, voice, speed, pitch, folder)
                        x = AF.resample(x, rate, recipe.sample_rate)
                        x = _place(x / x.abs().max().clamp_min(1e-4) * 0.5, length, rng)
                        snr = rng.uniform(*recipe.snr_db)
                        power = x.pow(2).sum() / (x.abs() > 0).sum().clamp_min(1)  # power of the speech part
                        noise = torch.randn(length, generator=gen) * (power / 10 ** (snr / 10)).sqrt()
                        waves.append((x + noise).clamp(-1, 1))
                        labels.append(label)
                        voices.append(voice)
                        test.append(variant in recipe.test_variants)
    return {
        "waves": (torch.stack(waves) * 32767).round().to(torch.int16),  # (N, length)
        "labels": torch.tensor(labels, dtype=torch.int64),
        "test": torch.tensor(test),
        "voices": voices,
    }


def speech_digits(
    recipe: SpeechDigitsRecipe | None = None, *, cache_dir: str | os.PathLike | None = None
) -> tuple[Split, Split]:
    """The spoken-digit set of ``recipe``, synthesised on first use and cached.

    Args:
        recipe: how to synthesise it (default :class:`SpeechDigitsRecipe()`).
        cache_dir: the cache root (default :func:`cache_root`); the set lies in
            ``<cache_dir>/speech_digits/<recipe.key()>/data.pt`` beside ``recipe.json``.

    Returns:
        ``((waves_train, y_train), (waves_test, y_test))``: float32 waveforms ``(N, samples)``
        in ``[-1, 1]`` at ``recipe.sample_rate``, int64 labels ``(N,)`` indexing ``recipe.words``.
        Train and test voices share no variant.

    Raises:
        RuntimeError: espeak-ng is missing or fails.

    Example:
        >>> from torchquant.integrations.speechbrain.data import SpeechDigitsRecipe
        >>> SpeechDigitsRecipe(accents=("en-us",), train_variants=("m1",), test_variants=("f1",)).key()
        '29cfb2cfab5ea28f'
    """
    recipe = recipe or SpeechDigitsRecipe()
    folder = Path(cache_dir if cache_dir is not None else cache_root()) / "speech_digits" / recipe.key()
    path = folder / "data.pt"
    if path.exists():
        data = torch.load(path, weights_only=True)
    else:
        data = _synthesise(recipe)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"data.pt.{os.getpid()}.tmp"
        torch.save({k: v for k, v in data.items() if k != "voices"}, tmp)
        (folder / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=1))
        (folder / "voices.json").write_text(json.dumps(data["voices"]))
        os.replace(tmp, path)  # atomic: a concurrent reader sees all or nothing
    waves = data["waves"].float() / 32767  # (N, samples)
    test = data["test"]
    return (waves[~test], data["labels"][~test]), (waves[test], data["labels"][test])


def fbank_features(waves: Tensor, *, n_mels: int = 40, sample_rate: int = 16000, batch_size: int = 256) -> Tensor:
    """Log mel filterbank features (speechbrain's ``Fbank``), mean-normalised per utterance.

    Args:
        waves: ``(N, samples)`` waveforms.
        n_mels: mel bands.
        sample_rate: the waveforms' sample rate, Hz.
        batch_size: waveforms per ``Fbank`` call.

    Returns:
        ``(N, frames, n_mels)`` features, 10 ms frames (101 for one second), each band's mean over
        the utterance subtracted.
    """
    from speechbrain.lobes.features import Fbank

    fbank = Fbank(n_mels=n_mels, sample_rate=sample_rate)
    with torch.no_grad():
        feats = torch.cat([fbank(waves[i : i + batch_size]) for i in range(0, len(waves), batch_size)])
    return feats - feats.mean(dim=1, keepdim=True)  # (N, T, n_mels)
