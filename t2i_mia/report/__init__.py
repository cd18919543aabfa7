"""t2i_mia.report"""
