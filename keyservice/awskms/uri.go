package awskms

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws/arn"
)

// Scheme is the key-URI scheme of this backend.
const Scheme = "awskms"

// uriForm is shown in parse errors so the operator sees the accepted shapes.
const uriForm = "awskms:///arn:aws:kms:REGION:ACCOUNT:key/KEY-ID or awskms:///alias/NAME, optionally followed by ?region=&endpoint=&key-id-suffix="

// KeyURI is a parsed awskms key URI.
type KeyURI struct {
	// Key is what KMS is asked for: a key ARN, an alias ARN or "alias/NAME".
	Key string
	// Region is the ARN's region or the region= option; empty means the SDK
	// configuration (AWS_REGION, profile) decides.
	Region string
	// Endpoint is a custom KMS endpoint URL (a VPC endpoint, local-kms).
	Endpoint string
	// KeyIDSuffix is appended to the key ID (see Options.KeyIDSuffix).
	KeyIDSuffix string
}

var (
	partitionRE = regexp.MustCompile(`^aws(-[a-z]+)*$`)
	regionRE    = regexp.MustCompile(`^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$`)
	accountRE   = regexp.MustCompile(`^[0-9]{12}$`)
	// KMS key IDs are UUIDs; multi-Region keys are "mrk-" and 32 hex digits.
	keyIDRE = regexp.MustCompile(`^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|mrk-[0-9a-fA-F]{32})$`)
	// Alias names: the KMS API pattern, at most 256 bytes with the "alias/" prefix.
	aliasNameRE = regexp.MustCompile(`^[a-zA-Z0-9/_-]{1,250}$`)
	// The suffix ends up in key IDs (logs, metrics, etcd), so it is kept to
	// visible characters that cannot be confused with the '#' separator.
	suffixRE = regexp.MustCompile(`^[A-Za-z0-9._:/@+=-]{1,128}$`)
)

// ParseURI parses a key URI of the form
//
//	awskms:///arn:aws:kms:REGION:ACCOUNT:key/KEY-ID
//	awskms:///arn:aws:kms:REGION:ACCOUNT:alias/NAME
//	awskms:///alias/NAME
//
// with the optional query options region= (must match the ARN's region),
// endpoint= (an http or https URL) and key-id-suffix=.
func ParseURI(uri string) (KeyURI, error) {
	scheme, rest, ok := strings.Cut(uri, ":")
	if !ok || !strings.EqualFold(scheme, Scheme) {
		return KeyURI{}, fmt.Errorf("key URI %q: scheme is not %s: want %s", uri, Scheme, uriForm)
	}
	rest, ok = strings.CutPrefix(rest, "///")
	if !ok {
		return KeyURI{}, fmt.Errorf("key URI %q: want three slashes after %q: %s", uri, Scheme+":", uriForm)
	}
	if strings.Contains(rest, "#") {
		return KeyURI{}, fmt.Errorf("key URI %q: a fragment (#) is not allowed", uri)
	}
	key, query, _ := strings.Cut(rest, "?")
	var u KeyURI
	var err error
	if u.Key, u.Region, err = parseKey(key); err != nil {
		return KeyURI{}, fmt.Errorf("key URI %q: %w", uri, err)
	}
	if err := u.parseQuery(query); err != nil {
		return KeyURI{}, fmt.Errorf("key URI %q: %w", uri, err)
	}
	return u, nil
}

// parseKey checks a key reference and returns it with the ARN's region.
func parseKey(key string) (ref, region string, err error) {
	if key == "" {
		return "", "", fmt.Errorf("no key: want %s", uriForm)
	}
	if name, ok := strings.CutPrefix(key, "alias/"); ok {
		if err := checkAlias(name); err != nil {
			return "", "", err
		}
		return key, "", nil
	}
	if !strings.HasPrefix(key, "arn:") {
		return "", "", fmt.Errorf("key %q is neither a key ARN nor alias/NAME (a bare key ID is not enough: use its ARN)", key)
	}
	a, err := arn.Parse(key)
	if err != nil {
		return "", "", fmt.Errorf("key ARN %q: %w", key, err)
	}
	switch {
	case !partitionRE.MatchString(a.Partition):
		return "", "", fmt.Errorf("key ARN %q: partition %q is not an AWS partition", key, a.Partition)
	case a.Service != "kms":
		return "", "", fmt.Errorf("key ARN %q: service is %q, want kms", key, a.Service)
	case !regionRE.MatchString(a.Region):
		return "", "", fmt.Errorf("key ARN %q: region %q is not a region name", key, a.Region)
	case !accountRE.MatchString(a.AccountID):
		return "", "", fmt.Errorf("key ARN %q: account %q is not 12 digits", key, a.AccountID)
	}
	if id, ok := strings.CutPrefix(a.Resource, "key/"); ok {
		if !keyIDRE.MatchString(id) {
			return "", "", fmt.Errorf("key ARN %q: key ID %q is not a KMS key ID (a UUID or mrk-<32 hex>)", key, id)
		}
		return key, a.Region, nil
	}
	if name, ok := strings.CutPrefix(a.Resource, "alias/"); ok {
		if err := checkAlias(name); err != nil {
			return "", "", fmt.Errorf("key ARN %q: %w", key, err)
		}
		return key, a.Region, nil
	}
	return "", "", fmt.Errorf("key ARN %q: resource %q is neither key/KEY-ID nor alias/NAME", key, a.Resource)
}

func checkAlias(name string) error {
	if !aliasNameRE.MatchString(name) {
		return fmt.Errorf("alias name %q: want 1 to 250 of a-z A-Z 0-9 / _ -", name)
	}
	return nil
}

func (u *KeyURI) parseQuery(query string) error {
	if query == "" {
		return nil
	}
	values, err := url.ParseQuery(query)
	if err != nil {
		return fmt.Errorf("query: %w", err)
	}
	for name, vals := range values {
		if len(vals) != 1 {
			return fmt.Errorf("option %s= is given %d times", name, len(vals))
		}
		v := vals[0]
		if v == "" {
			return fmt.Errorf("option %s= is empty", name)
		}
		switch name {
		case "region":
			if !regionRE.MatchString(v) {
				return fmt.Errorf("region=%q is not a region name", v)
			}
			if u.Region != "" && u.Region != v {
				return fmt.Errorf("region=%s differs from the key ARN's region %s", v, u.Region)
			}
			u.Region = v
		case "endpoint":
			if err := checkEndpoint(v); err != nil {
				return err
			}
			u.Endpoint = v
		case "key-id-suffix":
			if err := CheckKeyIDSuffix(v); err != nil {
				return err
			}
			u.KeyIDSuffix = v
		default:
			return fmt.Errorf("unknown option %q (want region, endpoint or key-id-suffix)", name)
		}
	}
	return nil
}

func checkEndpoint(v string) error {
	e, err := url.Parse(v)
	if err != nil {
		return fmt.Errorf("endpoint=: %w", err)
	}
	switch {
	case e.Scheme != "https" && e.Scheme != "http":
		return fmt.Errorf("endpoint=%q: want an http or https URL", v)
	case e.Host == "" || e.Hostname() == "":
		return fmt.Errorf("endpoint=%q: no host", v)
	case e.User != nil:
		return errors.New("endpoint=: user info is not allowed (credentials come from the AWS SDK's default chain)")
	case e.RawQuery != "" || e.Fragment != "" || e.ForceQuery:
		return fmt.Errorf("endpoint=%q: a query or fragment is not allowed", v)
	}
	return nil
}

// CheckKeyIDSuffix reports whether s can be used as a key-ID suffix.
func CheckKeyIDSuffix(s string) error {
	if !suffixRE.MatchString(s) {
		return fmt.Errorf("key ID suffix %q: want 1 to 128 of A-Z a-z 0-9 . _ : / @ + = -", s)
	}
	return nil
}

// IsARN reports whether u.Key is an ARN (a key or alias ARN).
func (u KeyURI) IsARN() bool { return strings.HasPrefix(u.Key, "arn:") }

// String returns the URI in its canonical form; ParseURI(u.String())
// returns u.
func (u KeyURI) String() string {
	q := url.Values{}
	if u.Region != "" && !u.IsARN() {
		q.Set("region", u.Region)
	}
	if u.Endpoint != "" {
		q.Set("endpoint", u.Endpoint)
	}
	if u.KeyIDSuffix != "" {
		q.Set("key-id-suffix", u.KeyIDSuffix)
	}
	s := Scheme + ":///" + u.Key
	if len(q) > 0 {
		s += "?" + q.Encode()
	}
	return s
}
