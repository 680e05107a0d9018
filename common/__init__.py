"""Plumbing shared by ppo.py, remax.py and rloo.py: nothing here is part of an algorithm's math."""
