"""t2i_mia.models"""
