package interop

// backends lists the key services the interop suite runs on: every backend
// against its real server where one runs here (SoftHSM2, local-kms, Vault, a
// real software TPM: swtpm), and the Cloud KMS and Azure Key Vault / Managed
// HSM stand-ins where none does.
func backends() []Backend {
	return []Backend{softkeyBackend(), pkcs11Backend(), awskmsBackend(), vaultBackend(), vaultCertBackend(),
		gcpkmsStandInBackend(), azurekvStandInBackend(false), azurekvStandInBackend(true), tpmBackend()}
}
