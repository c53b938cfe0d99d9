package interop

// backends lists the key services the interop suite runs on: every backend
// against its real server where one runs here (SoftHSM2, local-kms), and the
// Vault Transit stand-in where none does.
func backends() []Backend {
	return []Backend{softkeyBackend(), pkcs11Backend(), awskmsBackend(), vaultStandInBackend()}
}
