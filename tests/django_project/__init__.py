"""A minimal Django project for tests/test_django.py: settings and tasks, no models."""
