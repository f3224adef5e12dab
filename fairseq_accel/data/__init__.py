"""Corpus preparation: parallel text from gettext catalogs, IWSLT'14 de-en, speech data and features."""
