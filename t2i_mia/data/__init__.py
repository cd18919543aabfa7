"""t2i_mia.data"""
