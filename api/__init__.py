"""The REST API (FastAPI). Routes are thin: validation and persistence live in dagsmith/ and controller/."""
