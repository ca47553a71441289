"""The preference-data stage (`ray-crm prepare`): read, validate, measure Z, bin, tokenize, write.

Pure parts (spurious, binning, sampler, pairs, readers, encode) import no Ray; `pipeline` wires them into
Ray Data.
"""
