"""promptseg.runtime"""
