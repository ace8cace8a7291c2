"""promptseg.calibration"""
