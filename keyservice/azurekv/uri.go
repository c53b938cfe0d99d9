package azurekv

import (
	"fmt"
	"net/url"
	"regexp"
	"strings"
)

// Scheme is the key-URI scheme of this backend.
const Scheme = "azurekv"

const uriForm = "azurekv://VAULT.vault.azure.net/keys/NAME or azurekv://POOL.managedhsm.azure.net/keys/NAME, optionally followed by ?credential=managed-identity|workload-identity&client-id=GUID"

// Credential kinds.
const (
	CredentialManagedIdentity  = "managed-identity"
	CredentialWorkloadIdentity = "workload-identity"
)

// KeyURI is a parsed azurekv key URI.
type KeyURI struct {
	// VaultURL is https://HOST, the vault or Managed HSM pool.
	VaultURL string
	// HSM is true for a Managed HSM pool (AES keys, A256KW).
	HSM bool
	// Name is the key's name.
	Name string
	// Credential is CredentialManagedIdentity, CredentialWorkloadIdentity or
	// empty (workload identity when AZURE_FEDERATED_TOKEN_FILE is set, else
	// managed identity).
	Credential string
	// ClientID selects a user-assigned managed identity, or the workload
	// identity's application (default AZURE_CLIENT_ID).
	ClientID string
}

var (
	vaultSuffixes = []string{".vault.azure.net", ".vault.azure.cn", ".vault.usgovcloudapi.net", ".vault.microsoftazure.de"}
	hsmSuffixes   = []string{".managedhsm.azure.net", ".managedhsm.azure.cn", ".managedhsm.usgovcloudapi.net"}
	// Vault and pool names: 3-24 of a-z 0-9 -, starting with a letter.
	vaultNameRE = regexp.MustCompile(`^[a-z][a-z0-9-]{1,22}[a-z0-9]$`)
	keyNameRE   = regexp.MustCompile(`^[0-9a-zA-Z-]{1,127}$`)
	guidRE      = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)
)

// ParseURI parses
//
//	azurekv://VAULT.vault.azure.net/keys/NAME[?credential=...&client-id=...]
//	azurekv://POOL.managedhsm.azure.net/keys/NAME[?...]
func ParseURI(uri string) (KeyURI, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return KeyURI{}, fmt.Errorf("key URI: %w", err)
	}
	if !strings.EqualFold(u.Scheme, Scheme) {
		return KeyURI{}, fmt.Errorf("key URI: scheme is not %s: want %s", Scheme, uriForm)
	}
	if u.User != nil || u.Fragment != "" || u.Port() != "" || u.Opaque != "" {
		return KeyURI{}, fmt.Errorf("key URI: user info, a port or a fragment is not allowed: want %s", uriForm)
	}
	host := strings.ToLower(u.Hostname())
	var out KeyURI
	name, ok := "", false
	for _, sfx := range vaultSuffixes {
		if name, ok = strings.CutSuffix(host, sfx); ok {
			break
		}
	}
	if !ok {
		for _, sfx := range hsmSuffixes {
			if name, ok = strings.CutSuffix(host, sfx); ok {
				out.HSM = true
				break
			}
		}
	}
	if !ok || !vaultNameRE.MatchString(name) {
		return KeyURI{}, fmt.Errorf("key URI: host %q is not a Key Vault or Managed HSM host: want %s", host, uriForm)
	}
	out.VaultURL = "https://" + host
	key, ok := strings.CutPrefix(u.Path, "/keys/")
	if !ok || !keyNameRE.MatchString(key) {
		return KeyURI{}, fmt.Errorf("key URI: path %q: want /keys/NAME (1 to 127 of 0-9 a-z A-Z -; no version: the newest version is used)", u.Path)
	}
	out.Name = key
	for opt, vals := range u.Query() {
		if len(vals) != 1 || vals[0] == "" {
			return KeyURI{}, fmt.Errorf("key URI: option %s= must be given once, not empty", opt)
		}
		v := vals[0]
		switch opt {
		case "credential":
			if v != CredentialManagedIdentity && v != CredentialWorkloadIdentity {
				return KeyURI{}, fmt.Errorf("key URI: credential=%q: want %s or %s", v, CredentialManagedIdentity, CredentialWorkloadIdentity)
			}
			out.Credential = v
		case "client-id":
			if !guidRE.MatchString(v) {
				return KeyURI{}, fmt.Errorf("key URI: client-id= is not a GUID")
			}
			out.ClientID = v
		default:
			return KeyURI{}, fmt.Errorf("key URI: unknown option %q (want credential or client-id)", opt)
		}
	}
	return out, nil
}

// versionOf returns the version in a key ID (a key version's KID URL) of
// this vault and key, or false.
func (u KeyURI) versionOf(kid string) (string, bool) {
	v, ok := strings.CutPrefix(kid, u.VaultURL+"/keys/"+u.Name+"/")
	if !ok || v == "" || !keyNameRE.MatchString(v) {
		return "", false
	}
	return v, true
}
