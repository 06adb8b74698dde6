"""A capture loop for tests/test_mic_vad.py: frames -> VAD -> turns -> one wav, where Ctrl-C must leave nothing.

    python tests/helpers/capture_until_sigint.py OUT.wav (--input-file F [--realtime] | --mic DEVICE)
                                                 [--speaker DEVICE]

Prints `READY` once the first frame went through the detector, and `CLOSED source=... speaker=...` after
releasing everything (`True` = its audio stream is closed). Exit status: 0 when the input ran out (OUT.wav
holds every turn's audio), 130 on SIGINT (OUT.wav not created, nothing left in its folder).
With `--speaker`, each captured frame is also played, so an output stream is open and busy when the
signal comes.
"""

from __future__ import annotations

import argparse
import sys

from lyra_cli.audio.mic import AudioSource, FileSource, MicSource
from lyra_cli.audio.playback import AudioSink, SpeakerSink, WavWriter
from lyra_cli.audio.vad import TurnDetector, TurnEnded
from sinks import NullSink  # run as a script: this folder is sys.path[0]

EXIT_INTERRUPTED = 130  # 128 + SIGINT: what shells report for a command stopped by Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    source: AudioSource = MicSource(args.mic) if args.mic else FileSource(args.input_file, realtime=args.realtime)
    speaker: AudioSink = SpeakerSink(args.speaker) if args.speaker else NullSink()
    writer = WavWriter(args.out)
    try:
        _capture(source, speaker, writer)
        writer.close()
        return 0
    except KeyboardInterrupt:
        writer.abort()
        return EXIT_INTERRUPTED
    finally:
        source.close()
        speaker.close(wait=False)
        print(f"CLOSED source={_stream_closed(source)} speaker={_stream_closed(speaker)}", flush=True)


def _capture(source: AudioSource, speaker: AudioSink, writer: WavWriter) -> None:
    detector = TurnDetector()
    ready = False
    for frame in source:
        for event in detector.feed(frame):
            if isinstance(event, TurnEnded):
                writer.write(event.audio)
        speaker.write(frame)
        if not ready:
            print("READY", flush=True)
            ready = True
    for event in detector.flush():
        if isinstance(event, TurnEnded):
            writer.write(event.audio)


def _stream_closed(thing: object) -> str:
    stream = getattr(thing, "stream", None)
    if stream is not None:
        return str(stream.closed)
    return str(getattr(thing, "closed", None))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input-file")
    source.add_argument("--mic")
    parser.add_argument("--realtime", action="store_true")
    parser.add_argument("--speaker")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
