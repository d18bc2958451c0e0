"""whisperd: watch folders and turn recordings into transcripts and subtitles with Whisper."""

__version__ = "0.1.0"
