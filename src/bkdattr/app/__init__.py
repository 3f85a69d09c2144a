"""The application: the CLI, the pipeline, the report. It composes the method packages."""
