"""Config parts shared by the speech families (configs/bestrq_conformer.py, ...): audio data,
the log-mel front end, the Conformer and the frame masks. The sections that do not depend on
the modality (optimizer, sharding, checkpoints, evals) come from configs/common.py.
"""

import ml_collections

from configs import common

# Training-set sizes in utterances, to turn a paper's epochs into steps.
TRAIN_UTTERANCES = {"spoken_digits": 500, "tfds:librispeech": 281_241}


def steps_per_epoch(data: str, batch_size: int) -> int:
  """Steps in one pass over the training set: its size where known (spoken digits, a folder's
  audio files), else LibriSpeech 960 h's."""
  return common.steps_per_epoch(data, batch_size, default_examples=281_241,
                                known=TRAIN_UTTERANCES,
                                extensions=(".wav", ".flac", ".ogg"))


def audio_data_config(name: str, *, clip_seconds: float) -> ml_collections.ConfigDict:
  """The audio input pipeline (mim_jax/data/spoken_digits.py, audio_sources.py)."""
  digits = name == "spoken_digits"
  d = ml_collections.ConfigDict()
  d.name = name                  # spoken_digits | synthetic | tfds:<name> | folder:<path>
  d.modality = "audio"           # Picks the audio reader of folder:, tfds: and synthetic.
  d.split = "train"
  d.eval_split = "test" if digits else "validation"
  d.sample_rate = 16_000         # Hz; files at another rate are resampled on reading.
  d.clip_seconds = clip_seconds  # Every utterance is cropped (train: at a random offset) or
                                 # zero-padded to this length: one static shape, so one
                                 # compiled step; `audio_len` carries the real length, and the
                                 # padding is masked in the front end, model, masks and loss.
  d.num_classes = 10 if digits else 1
  common.add_reading_fields(d)
  return d


def frontend_config() -> ml_collections.ConfigDict:
  """The log-mel front end (mim_jax/data/logmel.py), computed on the device in the step.
  Defaults: 25 ms windows every 10 ms, 80 mel bins, as in the Conformer and BEST-RQ papers."""
  f = ml_collections.ConfigDict()
  f.window_ms = 25.0
  f.hop_ms = 10.0
  f.n_fft = 512                  # FFT size; at least the window (400 samples at 16 kHz).
  f.num_mels = 80
  f.fmin = 0.0                   # Hz.
  f.fmax = 0.0                   # Hz; 0 = half the sample rate.
  f.log_floor = 1e-6             # log(max(mel power, floor)).
  f.preemphasis = 0.0            # y[n] = x[n] - a x[n-1]; 0 = off (0.97 is common).
  f.normalize = "utterance"      # utterance (per-utterance, per-bin mean/std over real frames,
                                 # which BEST-RQ finds critical, sec. 3.1) | global | none.
  f.global_mean = 0.0            # normalize='global': (x - global_mean) / global_std.
  f.global_std = 1.0
  f.spec_augment = False         # SpecAugment (Park et al. 2019) on the features in training.
  f.freq_masks = 2               # Bands of up to freq_width bins set to 0.
  f.freq_width = 27
  f.time_masks = 2               # Spans of up to time_width frames set to 0.
  f.time_width = 40
  return f


def conformer_model_config(variant: str) -> ml_collections.ConfigDict:
  """The Conformer encoder (mim_jax/models/conformer.py)."""
  m = ml_collections.ConfigDict()
  m.name = "conformer"
  m.variant = variant            # S | M | L (Gulati et al. 2020, table 1) | Ti | Mu (tests).
  m.dropout = 0.1                # Dropout on every residual branch and after the subsampling
                                 # (Conformer sec. 3.2: 0.1).
  m.remat = "none"               # Rematerialise blocks to save accelerator memory: a policy of
                                 # models/layer_loop.py REMAT_POLICIES (none | full | ...).
  m.dtype = "float32"            # Compute dtype: float32 | bfloat16 | float16.
  m.param_dtype = "float32"
  m.attention_impl = "auto"      # auto | xla | cudnn (fused flash attention on GPU).
  return m


def frame_mask_config(name: str) -> ml_collections.ConfigDict:
  """Masks over frames (mim_jax/frame_masking.py), by name, with every generator's knobs."""
  m = ml_collections.ConfigDict()
  m.name = name                  # span | bestrq | tera (frame_masking.GENERATORS).
  # wav2vec 2.0 (Baevski et al. 2020, sec. 4.2): spans of 10 frames, start probability 0.065.
  m.span = ml_collections.ConfigDict()
  m.span.start_prob = 0.065
  m.span.length = 10
  m.span.min_spans = 1
  # BEST-RQ (Chiu et al. 2022, sec. 3.1): 400 ms spans (40 frames), start probability 0.01.
  m.bestrq = ml_collections.ConfigDict()
  m.bestrq.start_prob = 0.01
  m.bestrq.length = 40
  m.bestrq.min_spans = 1
  # TERA's time alteration (Liu et al. 2021, sec. III-A): spans of 7 frames over 15% of the
  # real frames; the method then zeroes, replaces or keeps them.
  m.tera = ml_collections.ConfigDict()
  m.tera.share = 0.15
  m.tera.length = 7
  m.tera.min_spans = 0
  # Feature alterations (frame_masking.ALTERATIONS), applied by the methods that list them.
  # TERA's frequency alteration (sec. III-B): one band of 0 to 20% of the mel bins set to 0.
  m.tera_frequency = ml_collections.ConfigDict()
  m.tera_frequency.max_share = 0.2
  # TERA's magnitude alteration (sec. III-C): Gaussian noise (std 0.2) on 15% of utterances.
  m.tera_magnitude = ml_collections.ConfigDict()
  m.tera_magnitude.prob = 0.15
  m.tera_magnitude.std = 0.2
  return m
