package interop

// backends lists the key services the interop suite runs on.
func backends() []Backend {
	return []Backend{softkeyBackend()}
}
