"""The local S3-compatible store of the ``s3`` fixture (conftest.py): its bucket, created empty for each test."""

BUCKET = "hospital-uploads"
