package tpm

import (
	"crypto/ecdh"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

// openDevice opens a TPM character device or a unix socket (swtpm).
func openDevice(path string) (transport.TPMCloser, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if st.Mode()&os.ModeSocket != 0 {
		return linuxudstpm.Open(path)
	}
	return linuxtpm.Open(path)
}

// keyTemplate is this backend's TPM key: an ECC P-256 decryption key (for
// TPM2_ECDH_ZGen) that never leaves the TPM, authorized by a PCR policy or
// by an empty password. unique makes every provisioned key a new one.
func keyTemplate(policy []byte, unique []byte) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			UserWithAuth:        len(policy) == 0,
			AdminWithPolicy:     len(policy) != 0,
			NoDA:                true,
			Decrypt:             true,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: policy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID:   tpm2.TPMECCNistP256,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: unique[:32]},
			Y: tpm2.TPM2BECCParameter{Buffer: unique[32:]},
		}),
	}
}

func pcrSelection(pcrs []uint) tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(pcrs...),
	}}}
}

// pcrPolicy reads the PCRs and returns the PolicyPCR digest a key bound to
// their current values has.
func pcrPolicy(t transport.TPM, pcrs []uint) ([]byte, error) {
	sel := pcrSelection(pcrs)
	rsp, err := tpm2.PCRRead{PCRSelectionIn: sel}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("TPM2_PCR_Read: %w", err)
	}
	if len(rsp.PCRValues.Digests) != len(pcrs) {
		return nil, fmt.Errorf("TPM2_PCR_Read returned %d of %d PCRs (is the SHA-256 bank allocated?)", len(rsp.PCRValues.Digests), len(pcrs))
	}
	h := sha256.New()
	for _, d := range rsp.PCRValues.Digests {
		h.Write(d.Buffer)
	}
	calc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		return nil, err
	}
	if err := (tpm2.PolicyPCR{PcrDigest: tpm2.TPM2BDigest{Buffer: h.Sum(nil)}, Pcrs: sel}).Update(calc); err != nil {
		return nil, err
	}
	return calc.Hash().Digest, nil
}

// readKey reads the public area at handle and checks it is one of our keys.
func readKey(t transport.TPM, h tpm2.TPMHandle) (tpm2.TPMTPublic, []byte, error) {
	rsp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(t)
	if err != nil {
		return tpm2.TPMTPublic{}, nil, fmt.Errorf("TPM2_ReadPublic 0x%x: %w", uint32(h), err)
	}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		return tpm2.TPMTPublic{}, nil, fmt.Errorf("public area at 0x%x: %w", uint32(h), err)
	}
	if err := checkPublic(pub); err != nil {
		return tpm2.TPMTPublic{}, nil, fmt.Errorf("key at 0x%x: %w", uint32(h), err)
	}
	return *pub, rsp.Name.Buffer, nil
}

var errNotOurKey = errors.New("not an ECC P-256 decryption key (TPM2_ECDH_ZGen)")

func checkPublic(pub *tpm2.TPMTPublic) error {
	a := pub.ObjectAttributes
	if pub.Type != tpm2.TPMAlgECC || !a.Decrypt || a.SignEncrypt || a.Restricted || !a.FixedTPM {
		return errNotOurKey
	}
	p, err := pub.Parameters.ECCDetail()
	if err != nil || p.CurveID != tpm2.TPMECCNistP256 {
		return errNotOurKey
	}
	return nil
}

// ecdhPub is a TPM public area's key for the software side of ECDH.
func ecdhPub(pub tpm2.TPMTPublic) (*ecdh.PublicKey, error) {
	p, err := pub.Parameters.ECCDetail()
	if err != nil {
		return nil, err
	}
	pt, err := pub.Unique.ECC()
	if err != nil {
		return nil, err
	}
	return tpm2.ECDHPub(p, pt)
}

// persistentHandles lists the occupied persistent handles in [first, last].
func persistentHandles(t transport.TPM, first, last tpm2.TPMHandle) ([]tpm2.TPMHandle, error) {
	var out []tpm2.TPMHandle
	next := first
	for {
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(next), PropertyCount: uint32(last-next) + 1}.Execute(t)
		if err != nil {
			return nil, fmt.Errorf("TPM2_GetCapability(handles): %w", err)
		}
		hs, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			return nil, err
		}
		for _, h := range hs.Handle {
			if h >= first && h <= last {
				out = append(out, h)
			}
		}
		if !rsp.MoreData || len(hs.Handle) == 0 || hs.Handle[len(hs.Handle)-1] >= last {
			return out, nil
		}
		next = hs.Handle[len(hs.Handle)-1] + 1
	}
}

// zgen runs TPM2_ECDH_ZGen with the key at h (name checked by the TPM),
// through a PCR policy session when the key is bound to PCRs, and returns
// the shared secret (the point's x coordinate).
func zgen(t transport.TPM, h tpm2.TPMHandle, name []byte, pcrs []uint, ephemeral []byte) ([]byte, error) {
	if len(ephemeral) != pointSize || ephemeral[0] != 4 {
		return nil, errMalformed
	}
	var auth tpm2.Session = tpm2.PasswordAuth(nil)
	if len(pcrs) > 0 {
		sel := pcrSelection(pcrs)
		auth = tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(t transport.TPM, handle tpm2.TPMISHPolicy, _ tpm2.TPM2BNonce) error {
			_, err := tpm2.PolicyPCR{PolicySession: handle, Pcrs: sel}.Execute(t)
			return err
		})
	}
	rsp, err := tpm2.ECDHZGen{
		KeyHandle: tpm2.AuthHandle{Handle: h, Name: tpm2.TPM2BName{Buffer: name}, Auth: auth},
		InPoint: tpm2.New2B(tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: ephemeral[1:33]},
			Y: tpm2.TPM2BECCParameter{Buffer: ephemeral[33:]},
		}),
	}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("TPM2_ECDH_ZGen with 0x%x: %w", uint32(h), err)
	}
	pt, err := rsp.OutPoint.Contents()
	if err != nil {
		return nil, err
	}
	z := pt.X.Buffer
	if len(z) < 32 { // the TPM may drop leading zeros
		z = append(make([]byte, 32-len(z)), z...)
	}
	return z, nil
}
