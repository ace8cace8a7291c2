"""promptseg.export"""
