package interop

// backends lists the key services the interop suite runs on: every backend
// against its real server where one runs here (SoftHSM2, local-kms, Vault, a
// real software TPM: swtpm), and the Cloud KMS stand-in where none does.
// Azure Key Vault is not here: its stand-in is the SDK's in-process fake
// transport, which a separate plugin process cannot reach.
func backends() []Backend {
	return []Backend{softkeyBackend(), pkcs11Backend(), awskmsBackend(), vaultBackend(), vaultCertBackend(),
		gcpkmsStandInBackend(), tpmBackend()}
}
