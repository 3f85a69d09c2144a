"""Report: figures (one file per stage figure under ``RUN/figures``) and the self-contained HTML report."""
