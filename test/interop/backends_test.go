package interop

// backends lists the key services the interop suite runs on: every backend
// against its real server (SoftHSM2, local-kms, Vault).
func backends() []Backend {
	return []Backend{softkeyBackend(), pkcs11Backend(), awskmsBackend(), vaultBackend(), vaultCertBackend()}
}
