"""The code version of every asset, declared here and nowhere else.

Dagster compares an asset's code version with the one recorded by the last materialization
of each partition: when they differ, the UI marks that track's asset stale, and the assets
downstream of it too (as it does when the source changes: `source_audio`'s data version is
the input file's sha256). The manifest's provenance records the track assets' versions.

**Bump an asset's version when the same input would now give a different output**: other
samples or bytes in its files, other fields or meanings in its JSON, other file names or
tags. Do not bump it for a refactor, a speed-up, an error message or anything else that
leaves the outputs as they were: a stale `stems` asks for every track to be separated again
(about 0.4 s per second of audio on two CPU cores), a stale `variants` for every track to be
re-mixed. A bump re-runs nothing by itself; the user decides (UI, `imaker backfill`).

Why declared rather than derived from the code: a hash of all the code would mark every
track stale on every commit, and a hash of the few functions that write an asset misses
changes in what they call (ffmpeg arguments, the model's windows) while flagging renames.
Whoever changes what an asset writes knows it; tests/test_checks.py shows on a real instance
that a changed version marks a processed track stale.

History (why each version is what it is):

* source_audio 2: inputs over full scale stored scaled down by one constant (source.json
  ``scale``), the input's peak and its tags (``source_tags``) in source.json.
* stems 2: the scaled source read back exactly, so loud inputs are no longer clipped
  before separation; one 24-bit FLAC ceiling (``audio.FLAC24_CEILING``) for the source and
  the stems (the stems were scaled from a 0.999 peak before).
* variants 2: version titles from the variant table, album artist, the input's tags copied,
  ReplayGain 2.0 track gain and peak tags; the anti-clipping gain from the streamed mix.
* manifest 2: ``loudness_lufs`` and ReplayGain per artifact, the input peak in the provenance.
* source_audio 3, variants 3, manifest 3 (issue 22, each file decoded once per stage): the
  loudness and waveform of source.flac measured and drawn while it is encoded (source.json
  ``loudness_lufs``/``true_peak_dbtp``/``waveform``, source.png); every variant measured as it
  is encoded (variants.json: duration, peak/RMS, codec, rate, channels, sha256, size, mtime;
  ReplayGain from the PCM sent to the encoder, not from a decode of the file), the
  instrumental's picture beside it; the manifest's durations are the written frames / rate
  (not ffprobe's container duration) and ``manifest_files.json`` records what it listed.
* source_audio 4, variants 4 (issue 22, the encoders' CPU): no true peak measured (ffmpeg's
  4x-oversampled ``ebur128=peak=true`` cost about 12% of an AAC encode); source.json has the
  sample peak of source.flac (``peak_dbfs``) instead of ``true_peak_dbtp``, and the
  ReplayGain track peak tag is the sample peak of the PCM encoded (ReplayGain 2.0 allows it;
  a few hundredths below the true peak on music).
* nas_copy 1: unchanged since it was added.
* catalog 2: also writes the library page (index.html); 3: the ``input_peak_dbfs`` and
  ``replaygain_db`` columns.
"""

CODE_VERSIONS: dict[str, str] = {
    "source_audio": "4",
    "stems": "2",
    "variants": "4",
    "manifest": "3",
    "nas_copy": "1",
    "catalog": "3",
}
