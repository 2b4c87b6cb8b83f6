"""Job set-up before the first step: data and prompt codecs, start-up validation, memory plan,
runtime (process group, topology)."""
