"""Presentation: tables, figures and the study report (reads results, computes nothing new)."""
